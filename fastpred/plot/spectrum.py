"""The spectrum figures: for one run, F's and W's eigenvalues over training, the alignment cos(u_j, W u_j) of W with
F's eigenvectors and the asymmetry of W (the paper's Fig. 2); across runs, F's last spectrum, mean alignment and
asymmetry side by side."""

from __future__ import annotations

import math

import numpy as np

from fastpred.plot.figure import DPI, not_recorded
from fastpred.plot.runs import Run

#: Rank-index lines drawn at most per eigenvalue panel; above it every k-th rank is drawn.
MAX_LINES = 128
#: F's eigenvalues below this fraction of the run's largest are not drawn on the log axis (zero to rounding).
LOG_FLOOR = 1e-10
#: The highlighted directions (largest eigenvalues of F) in the alignment panels.
TOP_K = 5


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
            not_recorded(ax, title, why)
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
        not_recorded(f_ax, "eigenvalues of F")
    no_w = f"not recorded (predictor: {run.config.get('predictor', '?')}, no linear W)"
    asym = spec.get("asymmetry")
    symmetric = asym is not None and np.nanmax(np.abs(asym), initial=0.0) < 1e-5
    if "w_eigs" in spec:
        title = "eigenvalues of W" if symmetric else "eigenvalues of (W + W^T) / 2"
        _trajectories(fig, w_ax, steps, spec["w_eigs"], title, "eigenvalue", logy=False)
    else:
        not_recorded(w_ax, "eigenvalues of W", no_w)
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
        not_recorded(align_ax, "alignment cos(u_j, W u_j)", no_w)
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
        not_recorded(asym_ax, "asymmetry of W", no_w)
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
            not_recorded(ax, title)
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
