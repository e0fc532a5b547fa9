"""A run's labelled sets: the training file and the probes' held-out set (`Split`), as the trainer's probes and
`python -m fastpred.eval` both take them."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastpred.data.named import NAMED_SOURCES, named_betons

#: Every HELD_OUT_EVERY-th image of a training file is held out for the probes when no --val is given.
HELD_OUT_EVERY = 10


class Split(NamedTuple):
    """A run's training file and the probes' held-out set: paths, subsets (None: every image) and a note."""

    train: Path
    val: Path
    train_indices: np.ndarray | None  # what SSL trains on and the probes fit
    val_indices: np.ndarray | None
    note: str


def named_split(name: str, rank: int = 0) -> Split:
    """A named source's cached train and test files: the probes fit the first and are scored on the second."""
    train, val = named_betons(name, rank)
    return Split(train, val, None, None, NAMED_SOURCES[name].held_out())


def held_out_split(data: str, val: str | None, rank: int = 0) -> Split:
    """The held-out set of a run on `data` (a .beton or a named source): `val`, the named source's test split, or
    (no `val`) every HELD_OUT_EVERY-th image of the training file, left out of SSL training and of the probes' fit."""
    if data in NAMED_SOURCES:
        return named_split(data, rank)
    if val is not None:
        return Split(Path(data), Path(val), None, None, f"{val}")
    from fastpred.data.loader import check_beton

    n = check_beton(data, {"image": "RGBImageField", "label": "IntField"})
    idx = np.arange(n)
    val_indices = idx[idx % HELD_OUT_EVERY == 0]
    return Split(Path(data), Path(data), idx[idx % HELD_OUT_EVERY != 0], val_indices,
                 f"no --val: every {HELD_OUT_EVERY}th image of {data} ({len(val_indices)} images), "
                 "left out of training")
