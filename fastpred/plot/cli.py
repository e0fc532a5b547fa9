"""`python -m fastpred.plot RUN_DIR [RUN_DIR ...] [--out DIR]`: every figure of the runs, as PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastpred.plot.figure import save_figure
from fastpred.plot.overview import overview_figure
from fastpred.plot.runs import Run, RunError, load_run, make_unique
from fastpred.plot.spectrum import compare_spectrum_figure, spectrum_figure


def plot_runs(runs: list[Run], out: Path) -> list[Path]:
    """Write every figure for ``runs`` into ``out``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    cycle = plt.get_cmap("tab10")
    colours = [cycle(i % 10) for i in range(len(runs))]
    written = []
    for run, colour in zip(runs, colours, strict=True):
        for kind, fig in (("overview", overview_figure([run], [colour])), ("spectrum", spectrum_figure(run))):
            path = out / f"{run.name}-{kind}.png"
            save_figure(fig, path)
            written.append(path)
    if len(runs) > 1:
        for kind, fig in (
            ("overview", overview_figure(runs, colours)),
            ("spectrum", compare_spectrum_figure(runs, colours)),
        ):
            path = out / f"compare-{kind}.png"
            save_figure(fig, path)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastpred.plot",
        description="Figures of fastpred training runs: an overview and the spectra of F and W per run; "
        "with several runs, the same compared.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (config.json, metrics.jsonl, ...)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the PNGs (default: RUN_DIR/plots for one run, ./plots for several)",
    )
    args = parser.parse_args(argv)
    try:
        runs = [load_run(path) for path in args.runs]
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: figures need matplotlib: pip install 'fastpred[plot]'", file=sys.stderr)
        return 2
    make_unique(runs)
    for run in runs:
        for note in run.notes:
            print(f"note: {note}", file=sys.stderr)
    out = args.out or (runs[0].path / "plots" if len(runs) == 1 else Path("plots"))
    try:
        written = plot_runs(runs, out)
    except OSError as error:
        print(f"error: cannot write figures to {out}: {error.strerror or error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
