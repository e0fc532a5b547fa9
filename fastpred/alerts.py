"""Warn-once alerts on counters that live on the device, without making the host wait for them."""

from __future__ import annotations

import warnings

import torch


class CounterAlert:
    """Warns once when a device counter becomes positive.

    On the CPU the counter is read directly. On CUDA each `poll` queues a copy of the counter into
    pinned host memory behind an event, and a later `poll` reads it once that event has completed
    (`Event.query` does not block): the warning comes a step or two late, and the step never waits on
    the GPU. During CUDA-graph capture nothing is queued; the counter itself keeps counting.
    """

    def __init__(self, message: str) -> None:
        self.message = message  # formatted with {count}
        self.fired = False
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._device: torch.device | None = None

    def poll(self, counter: torch.Tensor) -> None:
        if self.fired:
            return
        if counter.device.type != "cuda":
            self._fire_if_positive(int(counter))
            return
        # Everything on the counter's GPU, which need not be the current one: the capture test, the copy and the
        # event all see that GPU's current stream, so the event completes only after the copy it guards.
        with torch.cuda.device(counter.device):
            if torch.cuda.is_current_stream_capturing():
                return
            if self._event is not None:
                if not self._event.query():
                    return  # the last copy is still in flight: look again next time
                self._fire_if_positive(int(self._host))
                if self.fired:
                    return
            if self._host is None or self._device != counter.device:  # first poll, or the module moved GPU
                self._host = torch.zeros((), dtype=counter.dtype, pin_memory=True)
                self._event = torch.cuda.Event()
                self._device = counter.device
            self._host.copy_(counter, non_blocking=True)
            self._event.record()

    def _fire_if_positive(self, count: int) -> None:
        if count > 0:
            self.fired = True
            warnings.warn(self.message.format(count=count), RuntimeWarning, stacklevel=4)
