"""Stopping a run before its end, cleanly: what asks for a stop, and how a stopped run ends.

SIGINT and SIGTERM (Ctrl-C, a scheduler's preemption, torchrun forwarding either) ask for a stop: the current step
finishes, the loop reads the request at the log interval right after it (every process learns it there, in the
same all-reduce as the metrics), writes a checkpoint and ends with `Stopped` (exit code 128 + the signal). A second
Ctrl-C gives up at once; a repeated SIGTERM is the same request. Once training is done and checkpointed, only the
final evaluation is left, and a signal stops it at once: nothing is lost, and a resume runs it again.

A new reason to stop (a time limit, say) is a new source of `requested` here; the loop needs no change.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

from fastpred.core.files import WriteError
from fastpred.train.run_dir import RunDir


class Stopped(Exception):
    """Raised after a signal's checkpoint is written; carries the exit code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class StopRequests:
    """The requests to stop that reach this process, and the end of a stopped run."""

    def __init__(self, run: RunDir, *, rank: int):
        self.run, self.rank = run, rank
        self.signal: int | None = None  # the signal that asked for a stop, in this process
        self.final_step: int | None = None  # set once training is done and checkpointed at this step

    @property
    def requested(self) -> bool:
        """Whether this process was asked to stop (the others learn it at the next log interval)."""
        return self.signal is not None

    def enter_final_phase(self, step: int) -> None:
        """Training is done and its checkpoint written: from now on a signal stops the run at once."""
        self.final_step = step

    def _on_signal(self, signum, frame) -> None:
        if self.final_step is not None:
            # Nothing to save: the last step's checkpoint is written. Stop now rather than after the final
            # evaluation (hours on ImageNet, past any grace period); a resume runs it again.
            if self.rank == 0:
                print(f"\n{signal.Signals(signum).name}: stopped in the final evaluation; the checkpoint of "
                      f"step {self.final_step} is written", file=sys.stderr, flush=True)
            raise Stopped(128 + signum)
        if self.signal is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: give up at once
                raise KeyboardInterrupt
            # A repeated SIGTERM is the same request: at preemption the scheduler signals every process and
            # torchrun's agent forwards its own copy to the workers; SIGKILL is their way to insist.
            return
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint",
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """SIGINT and SIGTERM ask for a stop inside the block; the previous handlers are back after it."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop(self, step: int, epoch: int) -> None:
        """End a stopped run, once its checkpoint is written: the event, the way to continue, Stopped."""
        signum = self.signal or signal.SIGTERM  # the processes that were not signalled learned it from another
        if self.rank == 0:
            with contextlib.suppress(WriteError):
                self.run.record_event("stopped", step=step, epoch=epoch, signal=signal.Signals(signum).name)
            print(f"stopped at step {step}; checkpoint written. Continue with: "
                  f"python -m fastpred.train --resume {self.run.path} (or the same command with --auto-resume)",
                  file=sys.stderr, flush=True)
        raise Stopped(128 + signum)
