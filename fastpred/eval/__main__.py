"""python -m fastpred.eval RUN_DIR [--protocol knn|probe|linear] [--data TRAIN.beton --val VAL.beton | --data NAME]
[--epochs N] [--checkpoint PATH] [--arch NAME] [...]; one process, or every rank under torchrun.

Evaluates the backbone of RUN_DIR/checkpoint.pt (or of --checkpoint: a fastpred checkpoint or a bare torchvision-
layout backbone state dict) on the run's own training and held-out sets, as the trainer's probes use them, on
--data and --val, or on the train and test splits of a named source (--data digits or fashion-mnist), and writes
RUN_DIR/eval-<protocol>.json:

- knn: the trainer's weighted kNN (k = 20, temperature 0.07) of the held-out images against the training images;
- probe: the trainer's final probe, logistic regression on standardised frozen features (the official DirectPred
  code's protocol for STL-10 and CIFAR-10);
- linear: the augmented linear evaluation of SimSiam's Appendix A (fastpred.eval.linear), top-1 and top-5, a state
  per epoch in RUN_DIR/eval-linear.pt, --resume to continue it.

Exit codes: 0 done (or stopped by --stop-after), 2 bad input, and under torchrun 5 (the processes did not all
start within --start-timeout) or 6 (a collective waited past --dist-timeout, or another process left it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from fastpred.data.errors import DataError
from fastpred.eval.source import EvalError

PROTOCOLS = ("knn", "probe", "linear")
LINEAR_ONLY = ("optimizer", "batch_size", "lr", "resume", "stop_after")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from fastpred.core.distributed import DEFAULT_START_TIMEOUT_S, DEFAULT_TIMEOUT_MIN
    from fastpred.core.models import BACKBONES
    from fastpred.eval.linear import LARS_MIN_IMAGES

    p = _Parser(prog="python -m fastpred.eval", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a run folder (checkpoint.pt, config.json); eval-<protocol>.json is written there")
    p.add_argument("--protocol", choices=PROTOCOLS, default="knn", help="default: knn")
    p.add_argument("--data", metavar="TRAIN.beton",
                   help="images the probe or classifier is fitted on (with --val), or a named source (digits, "
                   "fashion-mnist): its train split, scored on its test split")
    p.add_argument("--val", metavar="VAL.beton", help="images it is scored on (with --data)")
    p.add_argument("--epochs", type=int,
                   help="probe: default the run's --final-probe-epochs (100); linear: default 90, as published")
    p.add_argument("--checkpoint", metavar="PATH", type=Path,
                   help="a fastpred checkpoint or a bare backbone state dict (default RUN_DIR/checkpoint.pt)")
    p.add_argument("--arch", choices=BACKBONES, help="the backbone's architecture (default: the checkpoint's run's)")
    p.add_argument("--resolution", type=int,
                   help="side of the crops (default: the run's; without a run 224, or 32 for the small backbones)")
    p.add_argument("--optimizer", choices=("lars", "sgd"),
                   help="linear: lars (published: batch 4096, base lr 0.02) or sgd (batch 256, base lr 30); "
                   f"default lars from {LARS_MIN_IMAGES} training images on, sgd below")
    p.add_argument("--batch-size", type=int, help="linear: images per step over all processes")
    p.add_argument("--lr", type=float, help="linear: base learning rate, scaled by batch / 256")
    p.add_argument("--resume", action="store_true", help="linear: continue RUN_DIR/eval-linear.pt")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="linear: stop once this epoch's state is saved (a job with a time limit), then --resume")
    p.add_argument("--workers", type=int, help="FFCV decoding threads per process (default: the run's, else all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MIN,
                   help=f"minutes a collective waits under torchrun (default {DEFAULT_TIMEOUT_MIN:g})")
    p.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S,
                   help="seconds the processes under torchrun wait for each other to start "
                   f"(default {DEFAULT_START_TIMEOUT_S:g}; then exit 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    from fastpred.core.distributed import WaitFailed

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except WaitFailed as e:  # every process says what it waited for
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code
    except (EvalError, DataError) as e:
        return _error(e)


def _error(e: Exception) -> int:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same problem; one says it
        print(f"error: {e}", file=sys.stderr)
    return 2


def _check_flags(args) -> None:
    given = [name for name in LINEAR_ONLY if getattr(args, name) not in (None, False)]
    if args.protocol != "linear" and given:
        raise EvalError(f"--{given[0].replace('_', '-')} applies only with --protocol linear")
    if args.epochs is not None and args.protocol == "knn":
        raise EvalError("--epochs applies to --protocol probe and linear; the kNN has no training")
    from fastpred.data.named import NAMED_SOURCES

    if args.data in NAMED_SOURCES:
        if args.val is not None:
            raise EvalError(f"--data {args.data} is scored on its own test split; --val goes with --data TRAIN.beton")
    elif (args.data is None) != (args.val is None):
        raise EvalError("--data and --val go together: the training and the held-out .beton")
    for name in ("epochs", "batch_size", "resolution", "stop_after"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        raise EvalError(f"--lr must be > 0, got {args.lr}")
    if not args.dist_timeout > 0:
        raise EvalError(f"--dist-timeout must be > 0 minutes, got {args.dist_timeout}")
    if not args.start_timeout > 0:
        raise EvalError(f"--start-timeout must be > 0 seconds, got {args.start_timeout}")


def _run(args) -> int:
    from fastpred.core import distributed as collective
    from fastpred.eval.source import load_backbone, read_backbone_state, read_run_settings

    _check_flags(args)
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EvalError(f"{run_dir} is not a folder")
    if args.checkpoint is None and not run_dir.is_dir():
        raise EvalError(f"no such run folder: {run_dir}")
    cfg = None
    if (run_dir / "config.json").is_file():
        cfg = read_run_settings(run_dir / "config.json")
    checkpoint = args.checkpoint or run_dir / "checkpoint.pt"
    if args.checkpoint is None and not checkpoint.is_file():
        raise EvalError(f"{run_dir} holds no checkpoint.pt (a run writes one after its first epoch); "
                        "name one with --checkpoint PATH")
    state, step, checkpoint_arch = read_backbone_state(checkpoint)
    arch = args.arch or checkpoint_arch or (cfg.backbone if cfg is not None else None)
    if arch is None:
        raise EvalError(f"{checkpoint} is a bare state dict: name its architecture with --arch")
    backbone, feat_dim = load_backbone(state, arch, checkpoint)
    del state
    if args.data is None and cfg is None:
        raise EvalError(f"{run_dir} has no config.json to take the data sets from; pass --data and --val")
    if args.data is None and cfg.data == "synthetic":
        raise EvalError(f"{run_dir} trained on synthetic images, which have no labels; pass --data and --val")
    if args.protocol == "linear" and not args.resume:
        from fastpred.eval.linear import state_in_progress

        busy = state_in_progress(run_dir / "eval-linear.pt")
        if busy:
            raise EvalError(f"{busy}: continue it with --resume, or delete the file to start again")

    joined = collective.active()  # called from a script that set up the process group: use it, leave it be
    if joined:
        import torch

        cuda = torch.distributed.get_backend() == "nccl"
        rank, world_size = collective.rank(), collective.world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    else:
        try:
            rank, world_size, device = collective.setup(args.device, args.dist_timeout, args.start_timeout)
        except RuntimeError as e:  # --device cuda without a GPU (a start that failed is a StartFailed)
            raise EvalError(str(e)) from None
    code = 1  # a crash, unless _evaluate returns or fails in a known way
    try:
        code = _evaluate(args, cfg, run_dir, checkpoint, step, arch, backbone, feat_dim, rank, world_size, device)
        return code
    except (EvalError, DataError):
        code = 2
        raise
    except RuntimeError as e:  # a collective that lost a process: the knn's gathers, the probe's reductions
        if collective.peer_failure(e):
            code = collective.EXIT_PEER_LOST
            raise collective.peer_lost(e) from e
        raise
    finally:
        if not joined:
            collective.teardown(code)  # bounded; past it, exit with this run's code


def _evaluate(args, cfg, run_dir, checkpoint, step, arch, backbone, feat_dim, rank, world_size, device) -> int:
    import torch

    from fastpred.data.augment import normalize_uint8
    from fastpred.data.named import NAMED_SOURCES
    from fastpred.data.split import Split, held_out_split, named_split
    from fastpred.eval.features import ProbeSets, extract_features
    from fastpred.eval.knn import knn_accuracy
    from fastpred.eval.probe import linear_probe_scores

    started = time.perf_counter()
    small = arch in ("small_cnn", "resnet18_small")
    resolution = args.resolution or (cfg.resolution if cfg is not None else (32 if small else 224))
    workers = args.workers if args.workers is not None else (cfg.workers if cfg is not None else -1)
    batch = max(cfg.batch_size, 256) if cfg is not None else 256  # the trainer's probe batch (and shard alignment)
    seed = cfg.seed if cfg is not None else 0
    if args.data in NAMED_SOURCES:
        split = named_split(args.data, rank)
    elif args.data is not None:
        split = Split(Path(args.data), Path(args.val), None, None, args.val)
    else:
        split = held_out_split(cfg.data, cfg.val, rank)
    sets = ProbeSets(split.train, split.train_indices, split.val, split.val_indices, resolution=resolution,
                     batch_size=batch, workers=workers, device=device, rank=rank, world_size=world_size)
    if sets.num_classes["train"] != sets.num_classes["val"]:
        raise EvalError(f"{split.train} has {sets.num_classes['train']} classes and {split.val} "
                        f"{sets.num_classes['val']}: the labels of the two sets must be the same classes")
    num_classes = sets.num_classes["train"]
    backbone = backbone.to(device)
    cuda = device.type == "cuda"
    if cuda:
        backbone.to(memory_format=torch.channels_last)
    amp = cuda and (cfg.amp if cfg is not None else True)
    preprocess = normalize_uint8
    result: dict = {"protocol": args.protocol}
    if args.protocol in ("knn", "probe"):
        train = extract_features(backbone, sets.loader("train"), preprocess, device, amp=amp, feat_dim=feat_dim)
        val = extract_features(backbone, sets.loader("val"), preprocess, device, amp=amp, feat_dim=feat_dim)
        if args.protocol == "knn":
            k = cfg.knn_k if cfg is not None else 20
            result["top1"] = knn_accuracy(*train, *val, k=k, temperature=0.07, block=sets.align)
            result["settings"] = {"k": k, "temperature": 0.07}
            summary = f"k {k}, temperature 0.07"
        else:
            epochs = args.epochs or (cfg.final_probe_epochs if cfg is not None else 100)
            # As the trainer's final probe: the classes are those the labels show (no num_classes).
            result.update(linear_probe_scores(*train, *val, epochs=epochs, seed=seed))
            result["settings"] = {"epochs": epochs, "lr": 0.1, "weight_decay": 1e-4, "batch_size": 256,
                                  "momentum": 0.9, "schedule": "cosine", "standardised": True, "seed": seed}
            summary = f"{_plural(epochs, 'epoch')} on standardised features"
    else:
        from fastpred.eval.linear import linear_eval, protocol_settings

        settings, note = protocol_settings(sets.size("train"), optimizer=args.optimizer, batch_size=args.batch_size,
                                           base_lr=args.lr, epochs=args.epochs, seed=seed)
        optimizer = settings.optimizer
        if note and rank == 0:
            print(note, flush=True)
        source = {"checkpoint": str(checkpoint), "step": step, "arch": arch, "train": str(split.train),
                  "val": str(split.val), "resolution": resolution}
        out = linear_eval(backbone, feat_dim, num_classes, sets, preprocess, settings,
                          state_path=run_dir / "eval-linear.pt", source=source, resume=args.resume, amp=amp,
                          stop_after=args.stop_after, log=_on_rank0(rank))
        if out is None:
            if rank == 0:
                print(f"linear: stopped after epoch {args.stop_after} of {settings.epochs}; continue with "
                      f"python -m fastpred.eval {run_dir} --protocol linear --resume (and the same flags)", flush=True)
            return 0
        result.update(out)
        result["settings"] = {**dataclasses.asdict(settings), "lr": settings.lr, "train_crop": "random resized + flip",
                              "val_crop": f"centre, {sets.crop_ratio:.4g} of the shorter side"}
        summary = f"{_plural(settings.epochs, 'epoch')}, {optimizer}, batch {settings.batch_size}, lr {settings.lr:.4g}"
    result.update({
        "step": step, "checkpoint": str(checkpoint), "arch": arch, "resolution": resolution,
        "train": {"path": str(split.train), "images": sets.size("train"), "subset": _subset(split, "train")},
        "val": {"path": str(split.val), "images": sets.size("val"), "subset": _subset(split, "val")},
        "world_size": world_size, "seconds": round(time.perf_counter() - started, 1),
    })
    if rank == 0:
        from fastpred.core.files import atomic_write

        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / f"eval-{args.protocol}.json"
        atomic_write(path, json.dumps(result, indent=2).encode())
        top5 = f", top-5 {result['top5']:.4f}" if "top5" in result else ""
        at = f"checkpoint step {step}" if step is not None else f"{checkpoint}"
        print(f"{args.protocol}: top-1 {result['top1']:.4f}{top5} on {sets.size('val')} held-out images "
              f"({summary}; {at}; {_plural(world_size, 'process', 'es')}) -> {path}", flush=True)
    return 0


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}{suffix if n != 1 else ''}"


def _on_rank0(rank: int):
    def say(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    return say


def _subset(split, name: str) -> str:
    from fastpred.data.split import HELD_OUT_EVERY

    indices = split.train_indices if name == "train" else split.val_indices
    if indices is None:
        return "every labelled image"
    held = f"every {HELD_OUT_EVERY}th image"
    return f"every labelled image but {held} (held out)" if name == "train" else f"{held}, labelled"


if __name__ == "__main__":
    sys.exit(main())
