"""What both figure families share: the resolution, the panel of a quantity a run did not record, and the atomic
write of a figure."""

from __future__ import annotations

from pathlib import Path

from fastpred.core.files import atomic_file

DPI = 100


def not_recorded(ax, title: str, why: str = "not recorded") -> None:
    """An empty panel that says why it is empty."""
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=11, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig, path: Path) -> None:
    """The figure as a PNG at ``path``, written atomically (a reader never sees half a PNG), then closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=DPI)
    finally:
        plt.close(fig)
