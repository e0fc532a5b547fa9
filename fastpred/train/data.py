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

import numpy as np
import torch

from fastpred.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize_ref
from fastpred.data.errors import DataError
from fastpred.train.distributed import barrier

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

    `train_views` iterates (x1, x2, y) uint8 batches on the device. `probe_train()` and `probe_val()` iterate
    (x, y) uint8 centre crops (`None` for synthetic data, which has nothing to probe); `held_out_note` says
    which held-out set the probes use.
    """

    def __init__(self, cfg, *, rank: int, world_size: int, device: torch.device):
        self.device = device
        self._eval_args: dict = {}
        self._eval_loaders: dict = {}
        if cfg.data == "synthetic":
            steps = cfg.synthetic_steps
            self.train_views = SyntheticViews(cfg.batch_size, cfg.resolution, steps, seed=cfg.seed, rank=rank,
                                              device=device)
            self.held_out_note = "none (synthetic data)"
            self._train_path = self._val_path = None
            return
        train_indices = None
        if cfg.data == "digits":
            self._train_path, self._val_path = digits_betons(rank)
            self.held_out_note = "the digits test split (every 5th image)"
            self._probe_train_indices = self._val_indices = None
        else:
            self._train_path = Path(cfg.data)
            if cfg.val is not None:
                self._val_path = Path(cfg.val)
                self.held_out_note = f"{cfg.val}"
                self._probe_train_indices = self._val_indices = None
            else:
                # No held-out file: hold out every 10th image, from the SSL training and from the probes' fit.
                from fastpred.data.loader import check_beton

                n = check_beton(self._train_path, {"image": "RGBImageField", "label": "IntField"})
                idx = np.arange(n)
                train_indices = idx[idx % HELD_OUT_EVERY != 0]
                self._val_path, self._val_indices = self._train_path, idx[idx % HELD_OUT_EVERY == 0]
                self._probe_train_indices = train_indices
                self.held_out_note = (f"no --val: every {HELD_OUT_EVERY}th image of {cfg.data} "
                                      f"({len(self._val_indices)} images), left out of training")
        from fastpred.data.loader import TwoViewLoader

        self.train_views = TwoViewLoader(
            self._train_path, cfg.batch_size, cfg.resolution, scale=(cfg.crop_scale, 1.0), seed=cfg.seed,
            rank=rank, world_size=world_size, device=device, num_workers=cfg.workers, indices=train_indices,
        )
        # Small images are probed whole; ImageNet-sized ones through the usual 224/256 centre crop.
        crop_ratio = 1.0 if cfg.resolution <= 96 else 224 / 256
        self._eval_args = dict(batch_size=max(cfg.batch_size, 256), resolution=cfg.resolution,
                               crop_ratio=crop_ratio, num_workers=cfg.workers, device=device)
        # Fail now on a bad held-out file, not after the first epoch.
        if self._val_path is not None:
            self.probe_val()

    @property
    def has_probes(self) -> bool:
        return self._val_path is not None

    def probe_train(self):
        return self._eval("train", self._train_path, self._probe_train_indices)

    def probe_val(self):
        return self._eval("val", self._val_path, self._val_indices)

    def _eval(self, name, path, indices):
        # Built once and iterated each epoch: every FFCV Loader compiles its pipeline anew (seconds).
        if name not in self._eval_loaders:
            from fastpred.data.loader import EvalLoader

            self._eval_loaders[name] = EvalLoader(path, indices=indices, **self._eval_args)
        return self._eval_loaders[name]


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
