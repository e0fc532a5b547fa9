"""The overview figure of one or several runs: loss, accuracies (online probe, kNN, final linear probe),
throughput, output std, effective rank of F, and a results table."""

from __future__ import annotations

import textwrap

from fastpred.plot.figure import DPI, not_recorded
from fastpred.plot.runs import Run, is_number

#: Characters per line of the results panel's text.
WRAP = 60


def _line_panel(ax, runs, colours, key, title, ylabel, *, x="step", rows="train", logy=False, reference=None):
    drawn = False
    for run, colour in zip(runs, colours, strict=True):
        xs, ys = run.series(key, x=x, rows=rows)
        if xs.size:
            ax.plot(xs, ys, color=colour, lw=1.4, marker="o" if xs.size < 3 else None, ms=3, label=run.label)
            drawn = True
    if not drawn:
        not_recorded(ax, title)
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
        if is_number(final):
            end = max([r["epoch"] for r in run.train + run.evals if is_number(r.get("epoch"))], default=0.0)
            ax.plot([end], [100 * final], color=colour, marker="*", ms=13, ls="none", mec="black", mew=0.6)
            drawn = True
    if not drawn:
        not_recorded(ax, title)
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
                if is_number(s.get(key)):
                    parts.append(f"{text} {fmt.format(scale * s[key])}")
            rows.append(("  ".join(parts) or "no accuracies in summary.json", "0.2", "normal"))
            parts = []
            for key, text, fmt in (
                ("effective_rank", "eff. rank", "{:.1f}"),
                ("output_std", "output std", "{:.3f}"),
                ("images_per_sec", "img/s", "{:,.0f}"),
                ("wall_time_s", "wall", "{:,.0f} s"),
            ):
                if is_number(s.get(key)):
                    parts.append(f"{text} {fmt.format(s[key])}")
            if parts:
                rows.append(("  ".join(parts), "0.2", "normal"))
        last = run.train[-1] if run.train else {}
        counters = [
            f"{k.replace('_', ' ')} {last[k]}"
            for k in ("skipped_updates", "unconverged_solves")
            if is_number(last.get(k)) and last[k] > 0
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
