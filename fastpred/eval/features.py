"""Frozen-backbone features, extracted once per evaluation point by every rank over its own shard of the labelled
images: the one extractor of the trainer's kNN monitor and final probes and of `python -m fastpred.eval`.

Sharding: the labelled images of a set, in file order, are cut into blocks of `align` images (the extraction
batch), and rank r reads a contiguous run of whole blocks (`shard_range`). Each image is read by exactly one rank,
no rank pads, and every batch is the batch one process would read, so N processes extract the same features as
one, and the kNN bank's blocks (`fastpred.eval.knn`) start at the same global rows whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fastpred.core import distributed as collective
from fastpred.data.errors import DataError

#: Small images are probed whole; ImageNet-sized ones through the usual resize-256, centre-crop-224.
SMALL_IMAGE_MAX = 96


def shard_range(n: int, rank: int, world_size: int, align: int = 1) -> tuple[int, int]:
    """Rows [lo, hi) of n that rank `rank` of `world_size` takes: whole blocks of `align` rows, the blocks
    split as evenly as the ranks allow (a rank may get none when there are fewer blocks than ranks)."""
    if not 0 <= rank < world_size or align < 1:
        raise ValueError(f"need 0 <= rank < world_size and align >= 1, got {rank}, {world_size}, {align}")
    blocks = -(-n // align)
    lo = rank * blocks // world_size * align
    hi = (rank + 1) * blocks // world_size * align
    return min(lo, n), min(hi, n)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """The module in eval mode (BatchNorm running statistics, no dropout); every submodule's mode restored after,
    even on an error."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def frozen_features(backbone: nn.Module, x: Tensor, preprocess: Callable[[Tensor], Tensor], *, amp: bool) -> Tensor:
    """fp32 features (B, D) of a uint8 batch already on the backbone's device; the caller holds no_grad and eval
    mode. bf16 autocast (`amp`, CUDA) for the backbone; the features come out in fp32 for the probes."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        return backbone(preprocess(x)).float()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    preprocess: Callable[[Tensor], Tensor],
    device: torch.device | str,
    *,
    amp: bool = False,
    feat_dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Features (N, D) float32 and labels (N,) int64 of every batch, both on `device`.

    Runs the backbone in eval mode on ``preprocess(x.to(device))`` for each ``(x, y)``, under bf16 autocast when
    `amp` (CUDA), and restores every submodule's mode afterwards. When `batches` knows its length in images
    (``num_images``, as `ProbeSets.loader` does), the features are written into one preallocated array: no list of
    batches and no concatenated copy (1.28M x 2048 fp32 is 10.5 GB; a rank's shard is that / world size). No
    batch is an error unless `feat_dim` is given (a rank whose shard is empty), which gives (0, feat_dim).
    """
    device = torch.device(device)
    rows = getattr(batches, "num_images", None)
    feats: Tensor | None = None
    parts: list[Tensor] = []
    labels: list[Tensor] = []
    filled = 0
    with eval_mode(backbone):
        for x, y in batches:
            out = frozen_features(backbone, x.to(device, non_blocking=True), preprocess, amp=amp)
            # A copy even on the CPU: there the loader's batches are views of FFCV's ring of buffers, which later
            # batches overwrite (the labels would change under us).
            labels.append(y.to(device, torch.int64, non_blocking=True, copy=True))
            if rows is None:
                parts.append(out)
                continue
            if feats is None:
                feats = torch.empty((rows, out.shape[1]), dtype=torch.float32, device=device)
            if filled + len(out) > rows:
                raise ValueError(f"the loader gave more than the {rows} images it announced")
            feats[filled : filled + len(out)] = out
            filled += len(out)
    if not labels:
        if feat_dim is None:
            raise ValueError("extract_features got no batches")
        return torch.empty((0, feat_dim), device=device), torch.empty((0,), dtype=torch.int64, device=device)
    if rows is None:
        return torch.cat(parts), torch.cat(labels)
    if filled != rows:
        raise ValueError(f"the loader gave {filled} of the {rows} images it announced")
    return feats, torch.cat(labels)


def beton_labels(path: str | os.PathLike, label_field: str = "label") -> np.ndarray:
    """Every image's label (N,) int64, read from the .beton's metadata table without decoding; checks the file."""
    from fastpred.data.loader import checked_tables

    # numpy only: FFCV is imported when a loader is built, not to read labels.
    tables = checked_tables(path, {"image": "RGBImageField", label_field: "IntField"})
    return np.asarray(tables.metadata[tables.column(label_field)], dtype=np.int64)


class _Shard:
    """This rank's part of a set: iterates the loader's (x, y) batches and says how many images it holds."""

    def __init__(self, loader, num_images: int):
        self._loader, self.num_images = loader, num_images

    def __iter__(self):
        return iter(self._loader)

    def __len__(self) -> int:
        return len(self._loader)


class ProbeSets:
    """The labelled images the evaluations read ("train": what the probes fit, "val": what they are scored on),
    and this rank's shard of each.

    Only images with a label >= 0 are read (STL-10's unlabeled split is never decoded). Files and labels are
    checked when this is built, on every rank; each rank's loader covers its own shard only and is built once,
    on first use (FFCV compiles a pipeline per loader: seconds).

    Args:
        train, val: .beton paths; train_indices, val_indices: subsets (None: every image), as the trainer's
            held-out split gives them.
        resolution: side of the centre crops (the training views' side); images up to 96 px are taken whole,
            larger ones through the 224/256 centre crop.
        batch_size: images per extraction batch; also the shard alignment (`shard_range`).
    """

    def __init__(self, train: str | os.PathLike, train_indices: np.ndarray | None, val: str | os.PathLike,
                 val_indices: np.ndarray | None, *, resolution: int, batch_size: int, workers: int,
                 device: torch.device, rank: int, world_size: int):
        self.paths = {"train": Path(train), "val": Path(val)}
        self.resolution, self.align, self.workers, self.device = resolution, batch_size, workers, device
        self.rank, self.world_size = rank, world_size
        self.crop_ratio = 1.0 if resolution <= SMALL_IMAGE_MAX else 224 / 256
        self.indices: dict[str, np.ndarray] = {}
        self.num_classes: dict[str, int] = {}
        read: dict[Path, np.ndarray] = {}  # a training file and its held-out slice are one file: read once
        for name, subset in (("train", train_indices), ("val", val_indices)):
            if self.paths[name] not in read:
                read[self.paths[name]] = beton_labels(self.paths[name])
            labels = read[self.paths[name]]
            idx = np.arange(len(labels)) if subset is None else np.asarray(subset, dtype=np.int64)
            idx = idx[labels[idx] >= 0]
            if len(idx) == 0:
                raise DataError(f"{self.paths[name]} has no labelled images in the probes' {name} set")
            self.indices[name] = idx
            self.num_classes[name] = int(labels.max()) + 1  # of the file: a held-out slice may miss a class
        self._loaders: dict[str, _Shard | list] = {}

    def size(self, name: str) -> int:
        """Labelled images in the whole set (all ranks)."""
        return len(self.indices[name])

    def shard(self, name: str) -> np.ndarray:
        """The image indices (into the .beton) this rank reads, in file order."""
        lo, hi = shard_range(len(self.indices[name]), self.rank, self.world_size, self.align)
        return self.indices[name][lo:hi]

    def loader(self, name: str) -> _Shard | list:
        """This rank's (x, y) uint8 centre crops of set `name` (an empty list when its shard is empty)."""
        if name not in self._loaders:
            shard = self.shard(name)
            if len(shard) == 0:
                self._loaders[name] = []
            else:
                from fastpred.data.loader import EvalLoader

                # rank 0 of 1: the shard is already this rank's, and the loader's own sharding would pad it.
                loader = EvalLoader(self.paths[name], self.align, self.resolution, crop_ratio=self.crop_ratio,
                                    num_workers=self.workers, device=self.device, indices=shard, rank=0,
                                    world_size=1)
                self._loaders[name] = _Shard(loader, len(shard))
        return self._loaders[name]


def labelled(feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The rows with labels >= 0, labels as int64; the features themselves (no copy) when every row has a label.
    Reads the mask on the host once (evaluation, outside the training step)."""
    if feats.dim() != 2 or labels.shape != feats.shape[:1]:
        raise ValueError(
            f"expected features (N, D) and labels (N,), got {tuple(feats.shape)} and {tuple(labels.shape)}"
        )
    keep = labels >= 0
    if bool(keep.all()):
        return feats, labels.long()
    return feats[keep], labels[keep].long()


def labelled_pair(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, *,
                  device: torch.device, many: bool, num_classes: int | None, who: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    """(x_train, y_train, x_test, y_test, num_classes, n_train, n_test): the labelled rows of a train and a test set
    on `device` (this rank's, with `many`), the number of classes (given, or largest label + 1 over both sets and
    all ranks) and the labelled row counts over all ranks, checked to be non-zero."""
    x_train, y_train = labelled(train_feats.to(device), train_labels.to(device))
    x_test, y_test = labelled(test_feats.to(device), test_labels.to(device))
    counts = torch.tensor([len(x_train), len(x_test)], device=device)
    if many:
        collective.all_reduce_(counts)
    n_train, n_test = (int(c) for c in counts)
    if n_train == 0 or n_test == 0:
        raise ValueError(f"{who} needs labelled rows: {n_train} in train, {n_test} in test")
    if num_classes is None:
        num_classes = num_classes_of([y_train, y_test], many)
    return x_train, y_train, x_test, y_test, num_classes, n_train, n_test


def over_ranks(flag: bool | None) -> bool:
    """Whether to evaluate over all ranks: by default when more than one process is running."""
    if flag is None:
        return collective.world_size() > 1
    if flag and not collective.active():
        raise ValueError("distributed evaluation needs an initialised torch.distributed process group")
    return flag


def num_classes_of(labels: list[Tensor], many: bool) -> int:
    """Largest label + 1 over these label tensors (and over all ranks when `many`)."""
    top = torch.tensor(max((int(t.max()) for t in labels if len(t)), default=0), device=labels[0].device)
    if many:
        collective.all_reduce_(top, op="max")
    return int(top) + 1
