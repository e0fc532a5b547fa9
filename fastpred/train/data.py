"""The trainer's data: two uint8 views per image from a .beton (FFCV, one JPEG decode), a named source (the
embedded digits, Fashion-MNIST) written once to cached .beton files, or synthetic images made on the device; and
the held-out sets of the probes.

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


#: Where `apt-get install dataset-fashion-mnist` puts the four IDX files; $FASHION_MNIST_DIR names another folder.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Part of every cache key: a change to how named sources are stored must not reuse files written the old way.
_CACHE_FORMAT = 1


class _Digits:
    """scikit-learn's 8x8 digits, embedded in the package: nothing to find, so its cache files have no key."""

    title, classes = "the embedded digits", 10

    def files(self) -> list[Path]:
        return []

    def source(self, split: str):
        from fastpred.data.sources import digits

        return digits(split)

    def held_out(self) -> str:
        return "the digits test split (every 5th image)"


class _FashionMNIST:
    """Fashion-MNIST's four IDX files, from FASHION_MNIST_DIR or the Debian package's folder."""

    title, classes = "Fashion-MNIST", 10

    def folder(self) -> Path:
        return Path(os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR)

    def files(self) -> list[Path]:
        from fastpred.data.idx import SPLIT_PREFIX, idx_files

        folder = self.folder()
        try:
            return [path for split in SPLIT_PREFIX for path in idx_files(folder, split)]
        except DataError as e:
            where = f"{e}" if folder.is_dir() else f"no folder {folder}"
            raise DataError(f"Fashion-MNIST not found ({where}): install it with `apt-get install -y "
                            "dataset-fashion-mnist`, or set FASHION_MNIST_DIR to a folder holding its four IDX "
                            "files") from None

    def source(self, split: str):
        from fastpred.data.idx import idx_source

        return idx_source(self.folder(), split)

    def held_out(self) -> str:
        return f"the Fashion-MNIST test split ({self.folder()})"


#: The data sets `--data NAME` names, each written once to the cache as train and test .beton files.
NAMED_SOURCES = {"digits": _Digits(), "fashion-mnist": _FashionMNIST()}


def _cache_key(files: list[Path]) -> str:
    """A short hash of the source files' names, sizes and modification times: a 2,000-image subset and the full set
    (or a newer copy) get different cache files, and reading the files is not needed to tell them apart."""
    if not files:
        return ""
    import hashlib

    stats = [(f.name, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    return "-" + hashlib.sha256(repr((_CACHE_FORMAT, stats)).encode()).hexdigest()[:12]


def named_betons(name: str, rank: int = 0) -> tuple[Path, Path]:
    """A named source (`NAMED_SOURCES`) as train and test .beton files in the cache, written once (by rank 0), raw."""
    from fastpred.data.write import write_beton

    named = NAMED_SOURCES[name]
    folder = cache_dir()
    key = _cache_key(named.files())  # on every rank: a missing source fails everywhere, not at the barrier
    paths = folder / f"{name}{key}-train.beton", folder / f"{name}{key}-test.beton"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for path, split in zip(paths, ("train", "test"), strict=True):
            if not path.exists():  # written to a temporary file and renamed: a present file is complete
                print(f"writing {named.title} ({split}) to {path}", flush=True)
                write_beton(named.source(split), path, compress_probability=0.0, workers=1)
    barrier()
    return paths


def digits_betons(rank: int = 0) -> tuple[Path, Path]:
    """The embedded digits as train and test .beton files in the cache."""
    return named_betons("digits", rank)


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


def named_split(name: str, rank: int = 0) -> Split:
    """A named source's cached train and test files: the probes fit the first and are scored on the second."""
    train, val = named_betons(name, rank)
    return Split(train, val, None, None, NAMED_SOURCES[name].held_out())


def held_out_split(cfg, rank: int = 0) -> Split:

    """The held-out set of a run on a .beton or a named source: `--val`, the named source's test split, or (no
    `--val`) every HELD_OUT_EVERY-th image of the training file, left out of SSL training and of the probes' fit."""
    if cfg.data in NAMED_SOURCES:
        return named_split(cfg.data, rank)
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
