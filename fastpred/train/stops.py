"""Stopping a run before its end, cleanly: what asks for a stop, and how a stopped run ends.

SIGINT and SIGTERM (Ctrl-C, a scheduler's preemption, torchrun forwarding either) ask for a stop: the current step
finishes, a checkpoint is written and the run ends with `Stopped` (exit code 128 + the signal). A second Ctrl-C
gives up at once; a repeated SIGTERM is the same request. Once training is done and checkpointed, only the final
evaluation is left, and a signal stops it at once: nothing is lost, and a resume runs it again.

One process stops after the step it is in. Under torchrun every process must stop at the same step, so a request
travels in a collective: in the log interval's all-reduce, and between intervals in a one-number all-reduce every
`every` steps, at the same steps on every process. `every` is planned at each log interval from the measured step
and checkpoint times (averaged over the processes, so that all plan the same) so that the steps to the next check
plus a checkpoint write fit `--stop-within` seconds (torchrun gives its workers 30 s, SLURM's KillWait is 30 s by
default). A check reads one number on the host: on a GPU a wait for the device once per `every` steps, which is
once per --stop-within seconds of training at most; the step itself never waits.

A new reason to stop (a time limit, say) is a new source of `requested` here; the loop needs no change.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

from fastpred.core import distributed
from fastpred.core.files import WriteError
from fastpred.train.run_dir import RunDir

#: `--stop-within`'s default: torchrun's agent SIGKILLs its workers 30 s after forwarding a SIGTERM, and SLURM's
#: default KillWait is 30 s; 10 s are left for the process's exit and a write slower than the last one.
DEFAULT_STOP_WITHIN_S = 20.0


class Stopped(Exception):
    """Raised after a signal's checkpoint is written; carries the exit code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class StopRequests:
    """The requests to stop that reach this process, and the end of a stopped run."""

    def __init__(self, run: RunDir, *, rank: int, world_size: int = 1, device: torch.device | None = None,
                 within_s: float = DEFAULT_STOP_WITHIN_S):
        self.run, self.rank, self.world_size = run, rank, world_size
        self.device = device or torch.device("cpu")
        self.within_s = within_s
        self.signal: int | None = None  # the signal that asked for a stop, in this process
        self.final_step: int | None = None  # set once training is done and checkpointed at this step
        # Steps between two checks under torchrun, the same on every process. 1 until the first interval has
        # measured a step: the first steps (compilation, cold caches) are the ones nobody can predict.
        self.every = 1
        self._warned = False

    @property
    def requested(self) -> bool:
        """Whether this process was asked to stop (the others learn it at the next log interval)."""
        return self.signal is not None

    def check_due(self, step: int) -> bool:
        """Whether every process checks for a stop request after `step` (under torchrun, between log intervals)."""
        return self.world_size > 1 and step % self.every == 0

    def agreed(self, step: int) -> bool:
        """Whether any process was asked to stop: one all-reduce of a flag, which every process makes after the same
        steps (`check_due`). Reads it on the host: the step is over by now on every process anyway."""
        flag = torch.tensor([float(self.requested)], device=self.device)
        with distributed.waiting(f"the other processes' stop check after step {step}"):
            dist.all_reduce(flag)
        return bool(flag.item())

    def plan(self, step_s: float, save_s: float, log_every: int) -> None:
        """Steps between checks so that the steps to the next check and a checkpoint write fit --stop-within, from
        the last interval's seconds per step and the last checkpoint's write (both averaged over the processes:
        every process plans the same). Warns once when even a check after every step cannot."""
        budget = self.within_s - 1.5 * save_s - 1.0  # a write slower than the last one, the check and the exit
        self.every = max(1, min(log_every, math.floor(budget / step_s) if step_s > 0 else log_every))
        if budget < step_s and not self._warned and self.rank == 0:
            self._warned = True
            print(f"warning: a step ({step_s:.1f} s) and a checkpoint write ({save_s:.1f} s) take longer than "
                  f"--stop-within {self.within_s:g} s: a stop request will take about {step_s + save_s:.0f} s",
                  file=sys.stderr, flush=True)

    def enter_final_phase(self, step: int) -> None:
        """Training is done and its checkpoint written: from now on a signal stops the run at once."""
        self.final_step = step
        if self.signal is not None:  # it came after the processes last compared requests, a moment ago
            self._stop_now(self.signal)

    def _stop_now(self, signum: int) -> None:
        # Nothing to save: the last step's checkpoint is written. Stop now rather than after the final
        # evaluation (hours on ImageNet, past any grace period); a resume runs it again.
        if self.rank == 0:
            print(f"\n{signal.Signals(signum).name}: stopped in the final evaluation; the checkpoint of "
                  f"step {self.final_step} is written", file=sys.stderr, flush=True)
        raise Stopped(128 + signum)

    def _on_signal(self, signum, frame) -> None:
        if self.final_step is not None:
            self._stop_now(signum)
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
