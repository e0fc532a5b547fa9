"""python -m fastpred.train.ablation [--seeds 0 1 2] [--out runs/ablation] [--only NAME ...] [--list]

The paper's central ablation on the embedded digits, over several seeds: every (method, predictor) pair, and the
trained heads with the official DirectPred code's predictor settings (a symmetric linear head, the predictor's own
learning rate). Each run is `python -m fastpred.train` with the digits preset and the row's flags, in its own
process, to `OUT/NAME-sSEED`; a run whose summary.json exists is not run again, so an interrupted ablation
continues where it stopped. Prints a markdown table: mean and spread (min to max) over the seeds.
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
# The trained heads with the official code's settings: its linear head is symmetrised after every step
# (`predictor_reg: symmetric`) and the predictor can have its own learning rate; x10 is the digits preset's 0.05.
TUNED = {
    "linear-sym": ["--predictor", "linear", "--pred-reg", "symmetric"],
    "linear-sym-lr10x": ["--predictor", "linear", "--pred-reg", "symmetric", "--pred-lr", "0.5"],
    "linear-lr10x": ["--predictor", "linear", "--pred-lr", "0.5"],
    "offdiag-lr10x": ["--predictor", "offdiag", "--pred-lr", "0.5"],
}
COLUMNS = (("linear_probe_acc", "linear probe", 3), ("knn_acc", "kNN", 3), ("output_std", "output std", 3),
           ("effective_rank", "effective rank of F", 2), ("train_time_s", "training s", 0))


def rows() -> dict[str, list[str]]:
    out = {f"{m}-{p}": ["--method", m, "--predictor", p] for m in METHODS for p in PREDICTORS}
    out.update({f"{m}-{name}": ["--method", m, *flags] for m in METHODS for name, flags in TUNED.items()})
    return out


def run_one(name: str, flags: list[str], seed: int, out: Path) -> dict:
    folder = out / f"{name}-s{seed}"
    summary = folder / "summary.json"
    if not summary.exists():
        if folder.exists():  # an interrupted run: start it again from scratch
            import shutil

            shutil.rmtree(folder)
        cmd = [sys.executable, "-m", "fastpred.train", *flags, "--seed", str(seed), "--progress", "plain",
               "--out", str(folder)]
        print(f"running {name} seed {seed}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def cell(values: list[float], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results: dict[str, list[dict]]) -> str:
    head = "| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, summaries in results.items():
        cells = [cell([s.get(key) for s in summaries], digits) for key, _, digits in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpred.train.ablation", description=__doc__.split("\n\n")[1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these rows (see --list)")
    parser.add_argument("--list", action="store_true", help="print the rows and their flags, run nothing")
    args = parser.parse_args(argv)
    grid = rows()
    if args.list:
        print("\n".join(f"{name}: {' '.join(flags)}" for name, flags in grid.items()))
        return 0
    unknown = sorted(set(args.only or ()) - set(grid))
    if unknown:
        print(f"error: unknown row(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = {k: v for k, v in grid.items() if not args.only or k in args.only}
    results = {name: [run_one(name, flags, seed, args.out) for seed in args.seeds] for name, flags in chosen.items()}
    print(f"seeds {' '.join(map(str, args.seeds))}: mean (min-max)")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
