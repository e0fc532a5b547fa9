"""python -m fastpred.train.ablation [--data digits|fashion-mnist] [--seeds 0 1 2] [--out DIR] [--only NAME ...]
[--epochs N] [--backbone NAME]

The paper's central ablation on a named data set, over several seeds: every (method, predictor) pair that the
paper compares, and on the digits also the trained heads with the official DirectPred code's predictor settings
(a symmetric linear head, the predictor's own learning rate). Each run is `python -m fastpred.train` with the data
set's preset (`--preset NAME` where one exists, else the digits preset) and the row's flags, in its own process,
to `OUT/NAME-sSEED`, with `--auto-resume`: a finished run is not run again, and one that was
stopped (a session's end, Ctrl-C) continues from its last checkpoint, so the ablation resumes row by row and
within a row; a row's folder that holds another run (another backbone or schedule) is refused, not read.
`--epochs` gives the table a shorter schedule than the preset's, `--backbone` another backbone (the table says so).
`--pixel-baselines` adds the raw-pixel classifiers of `fastpred.train.pixel_baselines` on the same split.
Prints a markdown table, mean and spread (min to max) over the seeds, and writes it to OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

METHODS = ("simsiam", "byol")
PREDICTORS = ("none", "directpred", "directcopy", "linear", "mlp", "offdiag")
#: The paper's comparison (Tian et al. 2021, tables 1-2): BYOL with every head, SimSiam with DirectPred and none.
PAPER = ("byol-directpred", "byol-directcopy", "byol-linear", "byol-mlp", "byol-offdiag", "byol-none",
         "simsiam-directpred", "simsiam-none")
# The trained heads with the official code's settings: its linear head is symmetrised after every step
# (`predictor_reg: symmetric`) and the predictor can have its own learning rate; x10 is the digits preset's 0.05.
TUNED = {
    "linear-sym": ["--predictor", "linear", "--pred-reg", "symmetric"],
    "linear-sym-lr10x": ["--predictor", "linear", "--pred-reg", "symmetric", "--pred-lr", "0.5"],
    "linear-lr10x": ["--predictor", "linear", "--pred-lr", "0.5"],
    "offdiag-lr10x": ["--predictor", "offdiag", "--pred-lr", "0.5"],
}
# Zhuo et al.'s (ICLR 2023) log filters of the batch's singular values in place of DirectPred's square root, with
# DirectPred's rho and eps, so that each row differs from byol-directpred by g alone. Not on the digits (their grid
# is published as is).
FILTER_ROWS = {f"byol-directpred-{g.replace('_', '-')}": ["--method", "byol", "--predictor", "directpred",
                                                          "--filter", g] for g in ("log", "log1p", "log1p_sq")}
# IsoLoss (Halvagal et al., NeurIPS 2023) with DirectPred: with the EMA target, and without it as the authors run it
# (target EMA 0: the target is the online network, stop-gradient; their `isoloss-noema` configs). Not on the digits.
_ISO = ["--method", "byol", "--predictor", "directpred", "--loss", "iso"]
ISO_ROWS = {"byol-directpred-iso": _ISO, "byol-directpred-iso-noema": [*_ISO, "--target-ema", "0"]}
COLUMNS = (("linear_probe_acc", "linear probe", 3), ("knn_acc", "kNN", 3),
           ("linear_probe_acc_random_init", "probe at random init", 3), ("output_std", "output std", 3),
           ("effective_rank", "effective rank of F", 2), ("train_time_s", "training s", 0))


def rows() -> dict[str, list[str]]:
    """Every row's trainer flags. The digits keep their full grid (20 rows, as published in docs/benchmarks.md);
    other data sets run the paper's rows (`PAPER`), the spectral filters (`FILTER_ROWS`) and IsoLoss (`ISO_ROWS`)
    unless `--only` names others of the grid."""
    out = {f"{m}-{p}": ["--method", m, "--predictor", p] for m in METHODS for p in PREDICTORS}
    out.update({f"{m}-{name}": ["--method", m, *flags] for m in METHODS for name, flags in TUNED.items()})
    out.update(FILTER_ROWS)
    out.update(ISO_ROWS)
    return out


def default_rows(data: str) -> list[str]:
    if data == "digits":
        return [name for name in rows() if name not in FILTER_ROWS and name not in ISO_ROWS]
    return [*PAPER, *FILTER_ROWS, *ISO_ROWS]


def preset_for(data: str) -> str:
    from fastpred.train.config import PRESETS

    return data if data in PRESETS else "digits"


def run_one(name: str, flags: list[str], seed: int, out: Path, *, data: str = "digits",
            extra: list[str] = ()) -> dict:
    folder = out / f"{name}-s{seed}"
    args = row_args(flags, seed, folder, data=data, extra=extra)
    if not finished(args):
        cmd = [sys.executable, "-m", "fastpred.train", *args]
        print(f"running {name} seed {seed}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((folder / "summary.json").read_text())


def row_args(flags: list[str], seed: int, folder: Path, *, data: str = "digits", extra: list[str] = ()) -> list[str]:
    """The `python -m fastpred.train` arguments of one row and seed, run in `folder`."""
    return ["--data", data, "--preset", preset_for(data), *flags, *extra, "--seed", str(seed), "--progress", "plain",
            "--out", str(folder), "--auto-resume"]


def finished(args: list[str]) -> bool:
    """The trainer's own --auto-resume decision on a row, taken in this process (no interpreter start per finished
    row): True when the row's folder holds this very run, finished. A folder that holds another run (the preset's
    backbone changed since, another --epochs) raises the trainer's one-line error instead of being read as this
    row."""
    from fastpred.train import config as train_config
    from fastpred.train.__main__ import auto_resume_plan

    how, _ = auto_resume_plan(vars(train_config.build_parser().parse_args(args)), say=False)
    return how == "finished"


def cell(values: list[float], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results: dict[str, list[dict]], baselines: dict[str, dict] | None = None) -> str:
    head = "| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, summaries in results.items():
        cells = [cell([s.get(key) for s in summaries], digits) for key, _, digits in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for result in (baselines or {}).values():  # one number each: the linear-probe column holds the test accuracy
        cells = [f"{result['accuracy']:.3f}"] + ["" for _ in COLUMNS[1:-1]] + [f"{result['seconds']:.0f}"]
        lines.append(f"| raw pixels: {result['settings']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fastpred.core.models import BACKBONES
    from fastpred.data.named import NAMED_SOURCES
    from fastpred.train.config import ConfigError
    from fastpred.train.run_dir import Diverged, RunError

    parser = argparse.ArgumentParser(prog="python -m fastpred.train.ablation", description=__doc__.split("\n\n")[1])
    parser.add_argument("--data", default="digits", choices=sorted(NAMED_SOURCES), help="a named data set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="default runs/ablation (digits), runs/ablation-DATA")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these rows (see --list)")
    parser.add_argument("--epochs", type=int, default=None, help="a shorter schedule than the preset's")
    parser.add_argument("--backbone", choices=BACKBONES, default=None, help="another backbone than the preset's")
    parser.add_argument("--pixel-baselines", action="store_true", help="add scikit-learn's raw-pixel classifiers")
    parser.add_argument("--list", action="store_true", help="print the rows and their flags, run nothing")
    args = parser.parse_args(argv)
    grid = rows()
    chosen_names = args.only or default_rows(args.data)
    if args.list:
        print("\n".join(f"{name}: {' '.join(grid[name])}" for name in chosen_names))
        return 0
    unknown = sorted(set(chosen_names) - set(grid))
    if unknown:
        print(f"error: unknown row(s) {', '.join(unknown)}; valid: {', '.join(grid)}", file=sys.stderr)
        return 2
    if args.epochs is not None and args.epochs < 1:
        print(f"error: --epochs must be >= 1, got {args.epochs}", file=sys.stderr)
        return 2
    out = args.out or Path("runs/ablation" if args.data == "digits" else f"runs/ablation-{args.data}")
    extra = ["--epochs", str(args.epochs)] if args.epochs is not None else []
    extra += ["--backbone", args.backbone] if args.backbone else []
    try:
        results = {name: [run_one(name, grid[name], seed, out, data=args.data, extra=extra) for seed in args.seeds]
                   for name in chosen_names}
    except subprocess.CalledProcessError as e:
        print(f"error: a run failed (exit {e.returncode}): {' '.join(e.cmd[2:])}; finished rows are kept, the same "
              "command continues", file=sys.stderr)
        return 1
    except (ConfigError, RunError, Diverged) as e:  # a row's folder that cannot be this row (the trainer's checks)
        print(f"error: {e}", file=sys.stderr)
        return 2
    baselines = None
    if args.pixel_baselines:
        from fastpred.train.pixel_baselines import measure

        baselines = measure(args.data, cache=out / "pixel-baselines.json")
    schedule = f"{args.epochs} epochs (shorter than the preset's)" if args.epochs else "the preset's schedule"
    schedule += f", backbone {args.backbone}" if args.backbone else ""
    text = (f"{args.data}, preset {preset_for(args.data)}, {schedule}; seeds {' '.join(map(str, args.seeds))}: "
            f"mean (min-max)\n\n{table(results, baselines)}\n")
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
