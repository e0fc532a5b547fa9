"""`python -m fastpred.train.torchrun ARGS` is `torchrun ARGS`, except for how a stop by signal ends.

torchrun's agent turns SIGTERM / SIGINT (preemption, scancel, Ctrl-C) into a SignalException: it forwards the
signal to the workers, waits for them (`--shutdown-timeout`, 30 s by default), then re-raises the exception, which
nothing catches: torchrun exits 1 with a traceback, whatever the workers did. The trainer's workers use that time to
finish the current log interval, write a checkpoint and exit with 128 + the signal; this launcher exits the same
way, with one line, so a scheduler can tell a stopped run from a crashed one. Worker failures are torchrun's own
report and exit code, unchanged; so is everything else (flags, rendezvous, --max-restarts). Restarts need nothing
from this launcher: the trainer's and the evaluation's process group start safely under plain torchrun
(`fastpred.core.distributed.setup`).
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

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
