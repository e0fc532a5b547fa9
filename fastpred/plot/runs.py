"""Reading a run folder for the figures: metrics.jsonl (train and eval lines, a resumed run's repeats resolved),
config.json, summary.json and spectrum.npz, each optional but the metrics; what cannot be read becomes a note."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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
        points = [(r[x], r[key]) for r in getattr(self, rows) if is_number(r.get(key)) and is_number(r.get(x))]
        if not points:
            return np.empty(0), np.empty(0)
        xs, ys = zip(*points, strict=True)
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def is_number(value) -> bool:
    """A finite int or float, not a bool: a value that can be drawn."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        if rows is None or not is_number(row.get("step")):
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


def make_unique(runs: list[Run]) -> None:
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
