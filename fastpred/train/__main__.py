"""python -m fastpred.train [--data PATH.beton | digits | fashion-mnist | synthetic] [--preset NAME]
[--resume RUN_DIR] [flags]

Without --data: BYOL with DirectPred on the embedded 8x8 digits, on whatever device there is, ending with the
held-out linear-probe accuracy of the trained backbone and of the same backbone at random initialisation.

Exit codes, one per way a run ends (every non-zero one but a crash's is one `error:` line or a stop message):
    0          trained to the end (or, with --auto-resume, found the run already finished)
    1          a crash (a Python traceback): a bug, or a fault below the trainer
    2          bad input: a flag, a data file, a run folder that cannot be used as asked; nothing is overwritten
    3          diverged: non-finite losses or parameters; the line names the first bad step and the last good
               checkpoint (no checkpoint is ever written from a non-finite state)
    4          the run folder could not be written (disk full, no permission); the previous checkpoint is intact
    5          under torchrun, the processes did not all start within --start-timeout (a process never joined)
    6          under torchrun, a collective or barrier waited past --dist-timeout, or another process left it
    128 + N    stopped by signal N (130 SIGINT, 143 SIGTERM) after writing a checkpoint: resume it
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

from fastpred.core.files import WriteError
from fastpred.data.errors import DataError
from fastpred.train import config as train_config
from fastpred.train.run_dir import Diverged, RunDir, RunError, default_folder, environment, holds_run

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_WRITE_FAILED = 2, 3, 4


def main(argv: list[str] | None = None) -> int:
    given = vars(train_config.build_parser().parse_args(argv))
    code = 1  # a crash, unless one of the outcomes below
    try:
        code = _outcome(given)
        return code
    finally:
        from fastpred.core import distributed

        distributed.teardown(code)  # bounded: NCCL's can hang when a peer is gone; past it, exit with `code`


def _outcome(given: dict) -> int:
    from fastpred.core.distributed import WaitFailed

    try:
        return _run(given)
    except WaitFailed as e:  # every process says what it waited for: they need not have waited for the same thing
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code
    except (train_config.ConfigError, RunError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as e:
        _error_once(e)
        return EXIT_DIVERGED
    except WriteError as e:
        _error_once(e)
        return EXIT_WRITE_FAILED


def _error_once(e: Exception) -> None:
    """Under torchrun every process ends the same way; process 0 says why (process group gone by now)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {e}", file=sys.stderr)


def _run(given: dict) -> int:
    from fastpred.core import distributed
    from fastpred.train.loop import Stopped, Trainer

    how = "new"  # new, resume (--resume), auto-resume, restart (--auto-resume on a run that has no checkpoint yet)
    if given.get("auto_resume"):
        if "resume" in given:
            raise train_config.ConfigError("--auto-resume starts or continues the run in --out DIR; drop --resume")
        how, given = auto_resume_plan(given)
        if how == "finished":
            return 0
    elif "resume" in given:
        how = "resume"
    _check_long_run_flags(given)
    saved = None
    if how in ("resume", "auto-resume"):
        saved = _saved_config(RunDir.open(given["resume"], writer=False))
        cfg = train_config.resumed(saved, given)
    else:
        cfg = train_config.resolve(given)
    try:
        rank, world_size, device = distributed.setup(cfg.device, cfg.dist_timeout, cfg.start_timeout)
    except RuntimeError as e:  # --device cuda without a GPU, or torchrun's variables half set
        raise train_config.ConfigError(str(e)) from None
    try:
        if cfg.resume:
            run = RunDir.open(cfg.resume, writer=rank == 0)
        elif how == "restart":
            run = RunDir(cfg.out, writer=rank == 0)
            run.check_writable("--out")
        else:
            cfg.out = cfg.out or str(default_folder(cfg.preset))
            run = RunDir.create(cfg.out, writer=rank == 0)
        trainer = Trainer(cfg, run, rank=rank, world_size=world_size, device=device)
        if cfg.resume:
            state = run.load_checkpoint()
            trainer.load_state_dict(state)
            _record_resume(run, how, saved, cfg, state, world_size, trainer.sources.views_note)
        else:
            if how == "restart":
                run.truncate_metrics(0)  # the lines of the attempt that left no checkpoint
            run.start(train_config.to_json(cfg), {**environment(device, world_size),
                                                  "train_views": trainer.sources.views_note},
                      event="restart" if how == "restart" else "start")
        if rank == 0:
            print(f"run folder {run.path}; {cfg.method} + {cfg.predictor}, {cfg.backbone}, {world_size} process(es) "
                  f"on {device.type}; {trainer.steps_per_epoch} steps per epoch of {trainer.global_batch} images; "
                  f"held-out set: {trainer.sources.held_out_note}", flush=True)
            print(trainer.threads.describe(), flush=True)
            print(f"training views: {trainer.sources.views_note}", flush=True)
            if how != "new":
                print(f"{how}: from step {trainer.step} (epoch {trainer.epoch})", flush=True)
        try:
            summary = trainer.fit()
        except Stopped as stop:
            return stop.code
        if rank == 0:
            _print_summary(summary)
        return 0
    except RuntimeError as e:  # a collective outside a labelled wait (DDP's, the step's) that lost a process
        if distributed.peer_failure(e):
            raise distributed.peer_lost(e) from e
        raise


def _check_long_run_flags(given: dict) -> None:
    for name in ("keep_every", "max_nonfinite_steps"):
        if given.get(name, 0) < 0:
            raise train_config.ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {given[name]}")


def _saved_config(run: RunDir) -> train_config.Config:
    try:
        return train_config.from_json(run.read_config())
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, train_config.ConfigError):
            raise
        raise RunError(f"cannot read {run.path / 'config.json'}: {str(e).splitlines()[0]}") from None


def auto_resume_plan(given: dict, *, say: bool = True) -> tuple[str, dict]:
    """What --auto-resume --out DIR does, decided by every process before any of them writes: start a new run
    (DIR holds none), continue it through the --resume path (DIR holds this run), start it again in place (this
    run, killed before its first checkpoint), or nothing (this run has finished). A different run in DIR, or
    this run ended by a divergence, is refused. `say`: print the line about a finished run (the ablation, which
    asks this of every row, does not)."""
    cfg = train_config.resolve(given)
    if not cfg.out:
        raise train_config.ConfigError("--auto-resume needs --out DIR: the folder to start the run in or continue it")
    run = RunDir(cfg.out, writer=False)
    if not holds_run(run.path):
        return "new", given
    if not (run.path / "config.json").is_file():
        raise RunError(f"--out {run.path} holds files of a run but no config.json; choose another folder")
    saved = _saved_config(run)
    ignored = train_config.RESUMABLE | {"out"}
    for f in dataclasses.fields(train_config.Config):
        old, new = getattr(saved, f.name), getattr(cfg, f.name)
        if f.name not in ignored and old != new:
            raise RunError(f"--out {run.path} holds a different run ({f.name} is {old!r} there, {new!r} here); "
                           "choose another folder, or continue that run with --resume")
    if divergence := run.divergence():
        then = (f"continue it on purpose with --resume {run.path} and a lower --lr"
                if (run.path / "checkpoint.pt").is_file() else "it left no checkpoint: start again in another folder")
        raise Diverged(f"--out {run.path}: this run diverged at step {divergence.get('step')} "
                       f"({divergence.get('reason')}); {then}")
    if not (run.path / "checkpoint.pt").is_file():
        return "restart", given
    if summary := run.finished(cfg.epochs, cfg.max_steps):
        if say and os.environ.get("RANK", "0") == "0":
            print(f"run folder {run.path}: this run has finished ({summary.get('steps')} steps, summary.json); "
                  "nothing to do", flush=True)
        return "finished", given
    # This command's own values of what a resume may change (--max-steps, --workers, ...), given or not.
    return "auto-resume", {**{k: getattr(cfg, k) for k in train_config.RESUMABLE}, "resume": cfg.out}


def _record_resume(run: RunDir, how: str, saved, cfg, state: dict, world_size: int, train_views: str) -> None:
    """events.jsonl gets every resume; a setting changed on purpose (train_config.RESCUE) also goes to
    config.json, so that the next resume keeps it."""
    changed = {k: [getattr(saved, k), getattr(cfg, k)] for k in sorted(train_config.RESCUE)
               if getattr(saved, k) != getattr(cfg, k)}
    if state.get("world_size") not in (None, world_size):
        changed["world_size"] = [state["world_size"], world_size]
    if changed:
        run.rewrite_config(train_config.to_json(dataclasses.replace(
            saved, **{k: getattr(cfg, k) for k in train_config.RESCUE})))
    run.record_event(how, step=state["step"], epoch=state["epoch"], world_size=world_size, changed=changed,
                     train_views=train_views,
                     restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), argv=sys.argv)


def _print_summary(s: dict) -> None:
    print(f"trained {s['steps']} steps in {s['train_time_s']:.1f} s ({s['images_per_sec']:.0f} images/s); "
          f"output std {_fmt(s['output_std'])}, effective rank of F {_fmt(s['effective_rank'])}")
    if s["knn_acc"] is not None:
        print(f"kNN accuracy on the held-out set: {s['knn_acc']:.4f}")
    if s["linear_probe_acc"] is not None:
        print(f"linear probe on held-out data: {s['linear_probe_acc']:.4f} "
              f"(same backbone at random initialisation: {s['linear_probe_acc_random_init']:.4f})")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    # Warnings (a skipped batch, a collapse alarm) read as one line in the log, not as a source listing.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    sys.exit(main())
