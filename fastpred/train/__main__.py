"""python -m fastpred.train [--data PATH.beton | digits | synthetic] [--preset NAME] [--resume RUN_DIR] [flags]

Without --data: BYOL with DirectPred on the embedded 8x8 digits, on whatever device there is, ending with the
held-out linear-probe accuracy of the trained backbone and of the same backbone at random initialisation.
"""

from __future__ import annotations

import sys
import warnings

from fastpred.data.errors import DataError
from fastpred.train import config as train_config
from fastpred.train.run_dir import RunDir, RunError, default_folder, environment


def main(argv: list[str] | None = None) -> int:
    given = vars(train_config.build_parser().parse_args(argv))
    try:
        return _run(given)
    except (train_config.ConfigError, RunError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(given: dict) -> int:
    from fastpred.train import distributed
    from fastpred.train.loop import Stopped, Trainer

    if "resume" in given:
        run_path = given["resume"]
        saved = train_config.from_json(RunDir.open(run_path, writer=False).read_config())
        cfg = train_config.resumed(saved, given)
    else:
        cfg = train_config.resolve(given)
    rank, world_size, device = distributed.setup(cfg.device)
    try:
        if cfg.resume:
            run = RunDir.open(cfg.resume, writer=rank == 0)
        else:
            cfg.out = cfg.out or str(default_folder(cfg.preset))
            run = RunDir.create(cfg.out, writer=rank == 0)
        trainer = Trainer(cfg, run, rank=rank, world_size=world_size, device=device)
        if cfg.resume:
            trainer.load_state_dict(run.load_checkpoint())
        else:
            run.start(train_config.to_json(cfg), environment(device, world_size))
        if rank == 0:
            print(f"run folder {run.path}; {cfg.method} + {cfg.predictor}, {cfg.backbone}, {world_size} process(es) "
                  f"on {device.type}; {trainer.steps_per_epoch} steps per epoch of {trainer.global_batch} images; "
                  f"held-out set: {trainer.sources.held_out_note}", flush=True)
        try:
            summary = trainer.fit()
        except Stopped as stop:
            return stop.code
        if rank == 0:
            _print_summary(summary)
        return 0
    finally:
        distributed.teardown()


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
