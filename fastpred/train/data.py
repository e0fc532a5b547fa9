"""The trainer's data: two uint8 views per image from a .beton (FFCV, one JPEG decode), the embedded digits
written once to a cached .beton, or synthetic images made on the device; and the held-out sets of the probes.

Every source is deterministic given (seed, epoch, batch): FFCV's order and crops are seeded per sample
(`fastpred.data.decode`), synthetic batches come from a generator seeded per batch, so a resumed run reads
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fastpred.core.distributed import barrier
from fastpred.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize_ref
from fastpred.data.errors import DataError

#: Every HELD_OUT_EVERY-th image of a training file is held out for the probes when no --val is given.
HELD_OUT_EVERY = 10
SYNTHETIC_CLASSES = 10
_MEAN_255 = tuple(255 * m for m in IMAGENET_MEAN)  # the training views' normalisation, on uint8 values
_STD_255 = tuple(255 * s for s in IMAGENET_STD)


def cache_dir() -> Path:
    return Path(os.environ.get("FASTPRED_CACHE") or Path.home() / ".cache" / "fastpred")


def digits_betons(rank: int = 0) -> tuple[Path, Path]:
    """The embedded digits as train and test .beton files in the cache, written once (by rank 0)."""
    from fastpred.data.sources import digits
    from fastpred.data.write import write_beton

    folder = cache_dir()
    paths = folder / "digits-train.beton", folder / "digits-test.beton"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for path, split in zip(paths, ("train", "test"), strict=True):
            if not path.exists():  # written to a temporary file and renamed: a present file is complete
                print(f"writing the embedded digits ({split}) to {path}", flush=True)
                write_beton(digits(split), path, compress_probability=0.0, workers=1)
    barrier()
    return paths


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised like the training views (the probes' preprocessing)."""
    return normalize_ref(x.float(), _MEAN_255, _STD_255)


class SyntheticViews:
    """Random uint8 views made on the device at the training resolution: the step without a loader.

    Batch b of epoch e comes from a generator seeded with (seed, e, b), so the data do not depend on
    where a run was resumed."""

    def __init__(self, batch_size: int, resolution: int, steps: int, *, seed: int, rank: int, device):
        self.batch_size, self.resolution, self.steps = batch_size, resolution, steps
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.num_samples = batch_size * steps
        self._epoch, self._skip = 0, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self._epoch, self._skip = epoch, skip_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch, skip = self._epoch, self._skip
        self._epoch, self._skip = epoch + 1, 0
        g = torch.Generator(self.device)
        shape = (self.batch_size, 3, self.resolution, self.resolution)
        for b in range(skip, self.steps):
            g.manual_seed(hash((self.seed, self.rank, epoch, b)) & 0x7FFF_FFFF_FFFF_FFFF)
            x1 = torch.randint(0, 256, shape, generator=g, device=self.device, dtype=torch.uint8)
            x2 = torch.randint(0, 256, shape, generator=g, device=self.device, dtype=torch.uint8)
            y = torch.randint(0, SYNTHETIC_CLASSES, (self.batch_size,), generator=g, device=self.device)
            yield x1, x2, y


class Sources:
    """Where a run's images come from: the training views, and the labelled sets of the probes.

    `train_views` iterates (x1, x2, y) uint8 batches on the device. `probes` (`fastpred.eval.ProbeSets`; `None`
    for synthetic data, which has nothing to probe) holds the labelled sets of the probes, of which
    `probe_train()` and `probe_val()` iterate this rank's shard as (x, y) uint8 centre crops; `held_out_note`
    says which held-out set the probes use.
    """

    def __init__(self, cfg, *, rank: int, world_size: int, device: torch.device):
        self.device = device
        self.probes = None
        if cfg.data == "synthetic":
            steps = cfg.synthetic_steps
            self.train_views = SyntheticViews(cfg.batch_size, cfg.resolution, steps, seed=cfg.seed, rank=rank,
                                              device=device)
            self.held_out_note = "none (synthetic data)"
            self._train_path = self._val_path = None
            return
        split = held_out_split(cfg, rank)
        self._train_path, self._val_path = split.train, split.val
        train_indices, self.held_out_note = split.train_indices, split.note
        from fastpred.data.loader import TwoViewLoader

        self.train_views = TwoViewLoader(
            self._train_path, cfg.batch_size, cfg.resolution, scale=(cfg.crop_scale, 1.0), seed=cfg.seed,
            rank=rank, world_size=world_size, device=device, num_workers=cfg.workers, indices=train_indices,
        )
        from fastpred.eval.features import ProbeSets

        # The held-out file and both sets' labels are checked now (not after the first epoch), on every rank;
        # each rank's loaders read its own shard and are built at the first evaluation.
        self.probes = ProbeSets(
            split.train, split.train_indices, split.val, split.val_indices, resolution=cfg.resolution,
            batch_size=max(cfg.batch_size, 256), workers=cfg.workers, device=device, rank=rank,
            world_size=world_size,
        )

    @property
    def has_probes(self) -> bool:
        return self.probes is not None

    def probe_train(self):
        return self.probes.loader("train")

    def probe_val(self):
        return self.probes.loader("val")


class Split(NamedTuple):
    """A run's training file and the probes' held-out set: paths, subsets (None: every image) and a note."""

    train: Path
    val: Path
    train_indices: np.ndarray | None  # what SSL trains on and the probes fit
    val_indices: np.ndarray | None
    note: str


def held_out_split(cfg, rank: int = 0) -> Split:
    """The held-out set of a run on a .beton or the digits: `--val`, the digits test split, or (no `--val`) every
    HELD_OUT_EVERY-th image of the training file, left out of SSL training and of the probes' fit."""
    if cfg.data == "digits":
        train, val = digits_betons(rank)
        return Split(train, val, None, None, "the digits test split (every 5th image)")
    if cfg.val is not None:
        return Split(Path(cfg.data), Path(cfg.val), None, None, f"{cfg.val}")
    from fastpred.data.loader import check_beton

    n = check_beton(cfg.data, {"image": "RGBImageField", "label": "IntField"})
    idx = np.arange(n)
    val_indices = idx[idx % HELD_OUT_EVERY == 0]
    return Split(Path(cfg.data), Path(cfg.data), idx[idx % HELD_OUT_EVERY != 0], val_indices,
                 f"no --val: every {HELD_OUT_EVERY}th image of {cfg.data} ({len(val_indices)} images), "
                 "left out of training")


def label_count(path: str | os.PathLike, label_field: str = "label") -> int:
    """Number of classes in a .beton (largest label + 1), read from FFCV's metadata table without decoding."""
    from fastpred.data.loader import check_beton

    check_beton(path, {"image": "RGBImageField", label_field: "IntField"})
    from ffcv.reader import Reader

    reader = Reader(os.fspath(path))
    column = list(reader.handlers).index(label_field)
    labels = np.asarray(reader.metadata[f"f{column}"])
    labels = labels[labels >= 0]
    if labels.size == 0:
        raise DataError(f"{path} has no labelled images; the probes need labels")
    return int(labels.max()) + 1
