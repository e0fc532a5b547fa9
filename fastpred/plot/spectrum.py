"""`python -m fastpred.plot RUN_DIR [RUN_DIR ...] [--out DIR]`: figures of one or several training runs.

For each run: ``<name>-overview.png`` (loss, accuracies, throughput, output std, effective rank, results)
and ``<name>-spectrum.png`` (eigenvalues of F and W over training, alignment cos(u_j, W u_j), asymmetry
of W: the paper's Fig. 2). With several runs also ``compare-overview.png`` and ``compare-spectrum.png``,
one colour per run. A run folder holds ``config.json``, ``metrics.jsonl`` and, where recorded,
``spectrum.npz`` and ``summary.json``; what a folder lacks is drawn as "not recorded".

Accuracies are fractions in [0, 1] in the files and drawn as percentages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Rank-index lines drawn at most per eigenvalue panel; above it every k-th rank is drawn.
MAX_LINES = 128
#: F's eigenvalues below this fraction of the run's largest are not drawn on the log axis (zero to rounding).
LOG_FLOOR = 1e-10
#: The highlighted directions (largest eigenvalues of F) in the alignment panels.
TOP_K = 5
DPI = 100
#: Characters per line of the results panel's text.
WRAP = 60


class RunError(Exception):
    """A run folder that cannot be plotted at all (reported as one ``error:`` line, exit code 2)."""


@dataclass
class Run:
    path: Path
    name: str  # unique among the runs plotted: the file-name prefix
    label: str  # "byol + directpred", unique among the runs plotted: the legend entry
    config: dict
    train: list[dict]
    evals: list[dict]
    spectrum: dict[str, np.ndarray] | None
    summary: dict | None
    notes: list[str] = field(default_factory=list)

    def series(self, key: str, x: str = "step", rows: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the lines that measured ``key`` (missing, null or non-numeric values are left out)."""
        points = [(r[x], r[key]) for r in getattr(self, rows) if _number(r.get(key)) and _number(r.get(x))]
        if not points:
            return np.empty(0), np.empty(0)
        xs, ys = zip(*points, strict=True)
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------- reading


def read_metrics(path: Path, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """The training and evaluation lines of a metrics.jsonl, each in step order.

    A line that is not a JSON object (a run killed mid-write leaves a truncated last line; a resumed run
    then appends after it) is skipped with a note. A resumed run logs again from its checkpoint's step:
    a line whose step is not past the previous line's replaces the earlier lines from that step on.
    """
    train: list[dict] = []
    evals: list[dict] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            where = "last line" if number >= len(lines) - 1 else f"line {number}"
            notes.append(f"{path}: skipped {where}, not a JSON object (truncated by a killed run?)")
            continue
        rows = {"train": train, "eval": evals}.get(row.get("kind"))
        if rows is None or not _number(row.get("step")):
            continue  # another kind of line, or one without a step: not drawn
        while rows and rows[-1]["step"] >= row["step"]:
            rows.pop()
        rows.append(row)
    return train, evals


def _read_json(path: Path, notes: list[str]) -> dict | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        notes.append(f"{path}: unreadable ({error}); not used")
        return None
    if not isinstance(value, dict):
        notes.append(f"{path}: not a JSON object; not used")
        return None
    return value


def _read_spectrum(path: Path, notes: list[str]) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:  # a received run folder must not run code
            spectrum = {name: data[name] for name in data.files}
    except Exception as error:  # a corrupt or foreign file: draw the rest of the run
        notes.append(f"{path}: unreadable ({type(error).__name__}: {error}); spectrum not drawn")
        return None
    steps = spectrum.get("step")
    if (
        steps is None
        or steps.ndim != 1
        or any(spectrum[k].shape[:1] != steps.shape for k in spectrum if k not in ("step", "f_source"))
    ):
        notes.append(f"{path}: arrays do not share one step axis; spectrum not drawn")
        return None
    return spectrum


def load_run(path: str | os.PathLike) -> Run:
    """Read a run folder; raises `RunError` if it is not a folder or holds no metrics.jsonl."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise RunError(f"{path}: no metrics.jsonl in this folder (not a fastpred run folder?)")
    notes: list[str] = []
    try:
        train, evals = read_metrics(metrics, notes)
    except OSError as error:
        raise RunError(f"{metrics}: cannot read ({error.strerror})") from error
    config = _read_json(path / "config.json", notes) or {}
    summary = _read_json(path / "summary.json", notes)
    spectrum = _read_spectrum(path / "spectrum.npz", notes)
    method, predictor = config.get("method"), config.get("predictor")
    label = " + ".join(str(v) for v in (method, predictor) if v) or path.resolve().name
    return Run(path, path.resolve().name, label, config, train, evals, spectrum, summary, notes)


def _make_unique(runs: list[Run]) -> None:
    """Distinct file names and legend labels: a shared label gets the folder name, a shared name an index."""
    names: dict[str, int] = {}
    for run in runs:
        run.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", run.name).strip("._") or "run"
        count = names.get(run.name, 0)
        names[run.name] = count + 1
        if count:
            run.name = f"{run.name}-{count + 1}"
    labels = [run.label for run in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.name})"


# ------------------------------------------------------------------------------------------------ panels


def _not_recorded(ax, title: str, why: str = "not recorded") -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=11, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _line_panel(ax, runs, colours, key, title, ylabel, *, x="step", rows="train", logy=False, reference=None):
    drawn = False
    for run, colour in zip(runs, colours, strict=True):
        xs, ys = run.series(key, x=x, rows=rows)
        if xs.size:
            ax.plot(xs, ys, color=colour, lw=1.4, marker="o" if xs.size < 3 else None, ms=3, label=run.label)
            drawn = True
    if not drawn:
        _not_recorded(ax, title)
        return
    if logy:
        ax.set_yscale("log")
    if reference is not None:
        value, text = reference
        ax.axhline(value, color="0.5", ls=":", lw=1)
        ax.annotate(text, (0.01, value), xycoords=("axes fraction", "data"), color="0.4", fontsize=8, va="bottom")
    ax.set_title(title)
    ax.set_xlabel("optimizer step" if x == "step" else "epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _accuracy_panel(ax, runs, colours) -> None:
    title = "accuracy"
    drawn = False
    for run, colour in zip(runs, colours, strict=True):
        xs, ys = run.series("online_probe_acc", x="epoch")
        if xs.size:
            ax.plot(xs, 100 * ys, color=colour, lw=1.0, alpha=0.6, marker="o" if xs.size < 3 else None, ms=3)
            drawn = True
        xs, ys = run.series("knn_acc", x="epoch", rows="evals")
        if xs.size:
            ax.plot(xs, 100 * ys, color=colour, lw=1.6, ls="--", marker="o", ms=4)
            drawn = True
        final = (run.summary or {}).get("linear_probe_acc")
        if _number(final):
            end = max([r["epoch"] for r in run.train + run.evals if _number(r.get("epoch"))], default=0.0)
            ax.plot([end], [100 * final], color=colour, marker="*", ms=13, ls="none", mec="black", mew=0.6)
            drawn = True
    if not drawn:
        _not_recorded(ax, title)
        return
    from matplotlib.lines import Line2D

    styles = [
        Line2D([], [], color="0.3", lw=1.0, alpha=0.6, label="online probe (train batches)"),
        Line2D([], [], color="0.3", lw=1.6, ls="--", marker="o", ms=4, label="kNN (epoch end)"),
        Line2D([], [], color="0.3", marker="*", ms=11, ls="none", mec="black", label="linear probe (final)"),
    ]
    ax.legend(handles=styles, fontsize=8, loc="lower right")
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)


def _results_panel(ax, runs, colours) -> None:
    """A small table: what each run is, and its final numbers (summary.json) and counters (last line)."""
    ax.set_axis_off()
    ax.set_title("results")
    lines = []
    for run, colour in zip(runs, colours, strict=True):
        c = run.config
        what = ", ".join(f"{k} {c[k]}" for k in ("backbone", "data", "epochs", "batch_size", "seed") if k in c)
        rows = [(run.label, colour, "bold")]
        rows += [(text, "0.2", "normal") for text in textwrap.wrap(what or "(no config.json)", WRAP)]
        s = run.summary
        if s is None:
            rows.append(("no summary.json (unfinished run?)", "0.4", "normal"))
        else:
            parts = []
            for key, text, scale, fmt in (
                ("linear_probe_acc", "linear probe", 100, "{:.2f}%"),
                ("linear_probe_acc_random_init", "random init", 100, "{:.2f}%"),
                ("knn_acc", "kNN", 100, "{:.2f}%"),
            ):
                if _number(s.get(key)):
                    parts.append(f"{text} {fmt.format(scale * s[key])}")
            rows.append(("  ".join(parts) or "no accuracies in summary.json", "0.2", "normal"))
            parts = []
            for key, text, fmt in (
                ("effective_rank", "eff. rank", "{:.1f}"),
                ("output_std", "output std", "{:.3f}"),
                ("images_per_sec", "img/s", "{:,.0f}"),
                ("wall_time_s", "wall", "{:,.0f} s"),
            ):
                if _number(s.get(key)):
                    parts.append(f"{text} {fmt.format(s[key])}")
            if parts:
                rows.append(("  ".join(parts), "0.2", "normal"))
        last = run.train[-1] if run.train else {}
        counters = [
            f"{k.replace('_', ' ')} {last[k]}"
            for k in ("skipped_updates", "unconverged_solves")
            if _number(last.get(k)) and last[k] > 0
        ]
        if counters:
            rows.append(("  ".join(counters), "tab:red", "normal"))
        lines.extend(rows)
    step = min(0.09, 0.95 / max(len(lines), 1))
    size = 10 if step >= 0.08 else 8
    for i, (text, colour, weight) in enumerate(lines):
        ax.text(
            0.0,
            0.97 - i * step,
            text,
            color=colour,
            fontweight=weight,
            fontsize=size,
            va="top",
            transform=ax.transAxes,
            clip_on=True,
        )


def overview_figure(runs: list[Run], colours: list):
    """Loss, accuracies, throughput, output std, effective rank and final results, one colour per run."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9), dpi=DPI)
    # Fixed margins: constrained layout would double the time to draw the figure.
    fig.subplots_adjust(
        left=0.06, right=0.98, bottom=0.07, top=0.88 if len(runs) > 1 else 0.91, wspace=0.28, hspace=0.3
    )
    a = axes.flat
    _line_panel(a[0], runs, colours, "loss", "training loss", "loss")
    _accuracy_panel(a[1], runs, colours)
    _line_panel(a[2], runs, colours, "images_per_sec", "throughput", "images / s")
    _line_panel(
        a[3],
        runs,
        colours,
        "output_std",
        "output std (collapse -> 0)",
        "std of l2-normalised z x sqrt(d)",
        reference=(1.0, "isotropic: 1"),
    )
    _line_panel(a[4], runs, colours, "effective_rank", "effective rank of F", "exp(entropy of eigenvalues)")
    _results_panel(a[5], runs, colours)
    if len(runs) == 1:
        fig.suptitle(f"{runs[0].label}: {runs[0].path}", fontsize=13)
    else:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, lw=2.5, label=r.label) for r, c in zip(runs, colours, strict=True)]
        fig.legend(handles=handles, loc="upper center", ncols=min(len(runs), 4), fontsize=10, frameon=False)
    return fig


def _row_mean(values: np.ndarray) -> np.ndarray:
    """Mean of each row's finite entries; NaN for a row with none (a record without W), without a warning."""
    finite = np.isfinite(values)
    count = finite.sum(axis=1)
    total = np.where(finite, values, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _subsample(d: int) -> np.ndarray:
    """Rank indices to draw: all if d <= MAX_LINES, else every k-th plus the last."""
    if d <= MAX_LINES:
        return np.arange(d)
    k = math.ceil(d / MAX_LINES)
    return np.unique(np.append(np.arange(0, d, k), d - 1))


def _above_log_floor(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """``values`` with entries <= LOG_FLOOR x their largest set to NaN, and whether a finite one was."""
    floor = np.nanmax(values, initial=0.0) * LOG_FLOOR
    hidden = bool((np.isfinite(values) & (values <= floor)).any())
    return np.where(values > floor, values, np.nan), hidden


def _trajectories(fig, ax, steps, values, title, ylabel, *, logy):
    """Each column of ``values`` (T, d) a thin line over ``steps``, coloured by rank index, with a colourbar."""
    from matplotlib.collections import LineCollection

    d = values.shape[1]
    ranks = _subsample(d)
    y = values[:, ranks].astype(float)
    if logy:
        # Eigenvalues below LOG_FLOOR of the run's largest are zero to rounding (float64 eigh of a rank-deficient
        # F gives ~1e-16 of the largest, of either sign): not drawn, so they do not stretch the axis.
        y, hidden = _above_log_floor(y)
        if hidden:
            ax.text(
                0.01,
                0.02,
                f"eigenvalues < {LOG_FLOOR:g} x largest (zero to rounding) not drawn",
                fontsize=8,
                color="0.35",
                transform=ax.transAxes,
            )
    segments = [np.column_stack([steps, y[:, i]]) for i in range(len(ranks))]
    lines = LineCollection(segments, array=ranks, cmap="viridis", linewidths=0.8)
    ax.add_collection(lines)
    if len(steps) < 3:  # a line needs two points: show the few records as dots as well
        ax.scatter(
            np.repeat(steps, len(ranks)), y.ravel(), c=np.tile(ranks, len(steps)), cmap="viridis", s=10, norm=lines.norm
        )
    finite = y[np.isfinite(y)]
    if logy:
        ax.set_yscale("log")
    if finite.size:
        lo, hi = finite.min(), finite.max()
        pad = (hi / lo) ** 0.05 if logy and lo > 0 else None
        ax.set_ylim((lo / pad, hi * pad) if pad else (lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1)))
    lo, hi = float(steps.min()), float(steps.max())
    ax.set_xlim((lo, hi) if hi > lo else (lo - 1, lo + 1))
    bar = fig.colorbar(lines, ax=ax, pad=0.01)
    bar.set_label("rank index j (0 = largest)")
    shown = "" if len(ranks) == d else f" ({len(ranks)} of {d} shown)"
    ax.set_title(title + shown)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def spectrum_figure(run: Run):
    """F's and W's eigenvalues over training, alignment cos(u_j, W u_j) and asymmetry of W (paper Fig. 2)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 9), dpi=DPI)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.07, top=0.91, wspace=0.15, hspace=0.3)
    (f_ax, w_ax), (align_ax, asym_ax) = axes
    fig.suptitle(f"{run.label}: spectra ({run.path})", fontsize=13)
    spec = run.spectrum or {}
    steps = spec.get("step")
    if steps is None or steps.size == 0:
        why = "not recorded (no spectrum.npz)" if run.spectrum is None else "not recorded (no record steps yet)"
        for ax, title in (
            (f_ax, "eigenvalues of F"),
            (w_ax, "eigenvalues of W"),
            (align_ax, "alignment cos(u_j, W u_j)"),
            (asym_ax, "asymmetry of W"),
        ):
            _not_recorded(ax, title, why)
        return fig
    marker = "o" if steps.size < 3 else None  # a line needs two points
    source = str(spec.get("f_source", ""))
    about_f = {"ema": "predictor's EMA", "batch": "z^T z / N of the record step"}.get(source, "")
    if "f_eigs" in spec:
        _trajectories(
            fig,
            f_ax,
            steps,
            spec["f_eigs"],
            f"eigenvalues of F ({about_f})" if about_f else "eigenvalues of F",
            "eigenvalue (log scale)",
            logy=True,
        )
    else:
        _not_recorded(f_ax, "eigenvalues of F")
    no_w = f"not recorded (predictor: {run.config.get('predictor', '?')}, no linear W)"
    asym = spec.get("asymmetry")
    symmetric = asym is not None and np.nanmax(np.abs(asym), initial=0.0) < 1e-5
    if "w_eigs" in spec:
        title = "eigenvalues of W" if symmetric else "eigenvalues of (W + W^T) / 2"
        _trajectories(fig, w_ax, steps, spec["w_eigs"], title, "eigenvalue", logy=False)
    else:
        _not_recorded(w_ax, "eigenvalues of W", no_w)
    if "alignment" in spec:
        cos = spec["alignment"].astype(float)
        for j in range(min(TOP_K, cos.shape[1])):
            align_ax.plot(steps, cos[:, j], color=plt.get_cmap("tab10")(j), lw=0.9, label=f"u_{j}", marker=marker)
        align_ax.plot(
            steps, _row_mean(cos), color="black", lw=2.2, marker=marker, label=f"mean over all {cos.shape[1]}"
        )
        align_ax.axhline(1.0, color="0.5", ls=":", lw=1)
        align_ax.set_ylim(-1.05, 1.05)
        align_ax.set_title("alignment cos(u_j, W u_j), u_j: eigenvectors of F")
        align_ax.set_xlabel("optimizer step")
        align_ax.set_ylabel("cosine")
        align_ax.legend(fontsize=8, loc="lower right", title="j: rank in F (0 = largest)", title_fontsize=8)
        align_ax.grid(alpha=0.3)
    else:
        _not_recorded(align_ax, "alignment cos(u_j, W u_j)", no_w)
    if asym is not None:
        asym_ax.plot(steps, asym, color="tab:purple", lw=1.5, marker=marker)
        asym_ax.set_ylim(bottom=0.0, top=max(np.nanmax(asym, initial=0.0) * 1.1, 1e-3))
        if symmetric:
            largest = np.nanmax(np.abs(asym), initial=0.0)
            asym_ax.text(
                0.5,
                0.5,
                f"W symmetric: largest asymmetry {largest:.1e}",
                ha="center",
                va="center",
                transform=asym_ax.transAxes,
                color="0.3",
                fontsize=11,
            )
        asym_ax.set_title("asymmetry ||W - W^T||_F / ||W||_F")
        asym_ax.set_xlabel("optimizer step")
        asym_ax.set_ylabel("relative norm")
        asym_ax.grid(alpha=0.3)
    else:
        _not_recorded(asym_ax, "asymmetry of W", no_w)
    return fig


def compare_spectrum_figure(runs: list[Run], colours: list):
    """Across runs: F's last recorded spectrum (normalised), mean alignment and asymmetry over steps."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), dpi=DPI)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.11, top=0.9, wspace=0.22)
    last_ax, align_ax, asym_ax = axes
    drawn = {"f": False, "align": False, "asym": False}
    for run, colour in zip(runs, colours, strict=True):
        spec = run.spectrum or {}
        steps = spec.get("step")
        if steps is None or steps.size == 0:
            continue
        if "f_eigs" in spec:
            s = spec["f_eigs"][-1].astype(float)
            if np.isfinite(s).all() and s[0] > 0:
                s = _above_log_floor(s / s[0])[0]
                last_ax.plot(np.arange(s.size), s, color=colour, lw=1.6, label=f"{run.label} (step {steps[-1]})")
                drawn["f"] = True
        marker = "o" if steps.size < 3 else None  # a line needs two points
        if "alignment" in spec:
            align_ax.plot(steps, _row_mean(spec["alignment"]), color=colour, lw=1.6, marker=marker, label=run.label)
            drawn["align"] = True
        if "asymmetry" in spec:
            asym_ax.plot(steps, spec["asymmetry"], color=colour, lw=1.6, marker=marker, label=run.label)
            drawn["asym"] = True
    panels = (
        (last_ax, "f", "F's spectrum at the last record", "rank index j (0 = largest)", "s_j / s_0 (log scale)"),
        (align_ax, "align", "mean alignment cos(u_j, W u_j)", "optimizer step", "cosine"),
        (asym_ax, "asym", "asymmetry ||W - W^T||_F / ||W||_F", "optimizer step", "relative norm"),
    )
    for ax, key, title, xlabel, ylabel in panels:
        if not drawn[key]:
            _not_recorded(ax, title)
            continue
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if drawn["f"]:
        last_ax.set_yscale("log")
    if drawn["align"]:
        align_ax.set_ylim(-1.05, 1.05)
    return fig


# ---------------------------------------------------------------------------------------------- the command


def _save(fig, path: Path) -> None:
    """savefig to a temporary file beside ``path``, then rename: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(temp, path)
    finally:
        plt.close(fig)
        if os.path.exists(temp):
            os.remove(temp)


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
            _save(fig, path)
            written.append(path)
    if len(runs) > 1:
        for kind, fig in (
            ("overview", overview_figure(runs, colours)),
            ("spectrum", compare_spectrum_figure(runs, colours)),
        ):
            path = out / f"compare-{kind}.png"
            _save(fig, path)
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
    _make_unique(runs)
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


if __name__ == "__main__":
    sys.exit(main())
