"""Indexable image sources for the .beton writer: ImageFolder trees, torchvision's CIFAR-10 / STL-10 folders,
and scikit-learn's 8x8 digits. Each source yields `(image, label)` with image a uint8 (H, W, 3) array."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from fastpred.data.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_SIZE = 32  # 8x8 digits are upsampled 4x (nearest) so that random resized crops have pixels to work with


class ArraySource:
    """Images already in memory: (N, H, W, 3) uint8 and (N,) int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8, images.shape
        assert len(images) == len(labels)
        self.images, self.labels, self.name = images, np.asarray(labels, dtype=np.int64), name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class ImageFolderSource:
    """ImageNet layout: SRC/<class>/<image>; labels are class indices in sorted class-name order."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        self.samples: list[tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(root / cls, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), label))
        self.name = f"ImageFolder {root} ({len(self.classes)} classes)"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), label


def _cifar10(folder: Path, split: str) -> ArraySource:
    names = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
    if split not in names:
        raise DataError(f"CIFAR-10 has splits train and test, not {split!r}")
    xs, ys = [], []
    for n in names[split]:
        with open(folder / n, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d["labels"]))
    return ArraySource(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), f"CIFAR-10 {split}")


def _stl10(folder: Path, split: str) -> ArraySource:
    parts = {"train": ["train"], "test": ["test"], "unlabeled": ["unlabeled"]}
    parts["train+unlabeled"] = parts["train"] + parts["unlabeled"]
    if split not in parts:
        raise DataError(f"STL-10 has splits {', '.join(parts)}, not {split!r}")
    xs, ys = [], []
    for p in parts[split]:
        # Stored column-major per channel: (N, 3, 96, 96) with H and W swapped.
        x = np.fromfile(folder / f"{p}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
        y_path = folder / f"{p}_y.bin"
        y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1 if y_path.exists() else np.full(len(x), -1)
        xs.append(x)
        ys.append(y)  # unlabeled images get label -1
    return ArraySource(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), f"STL-10 {split}")


def digits(split: str = "train") -> ArraySource:
    """scikit-learn's 1797 8x8 digits (0..16 grey levels) as 32x32 RGB uint8; test = every 5th image."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(len(d.images))
    keep = {"train": idx % 5 != 0, "test": idx % 5 == 0, "all": np.ones_like(idx, dtype=bool)}
    if split not in keep:
        raise DataError(f"digits has splits train, test and all, not {split!r}")
    grey = np.round(d.images[keep[split]] * (255 / 16)).astype(np.uint8)  # (N, 8, 8)
    k = DIGITS_SIZE // 8
    big = grey.repeat(k, axis=1).repeat(k, axis=2)
    rgb = np.ascontiguousarray(np.repeat(big[..., None], 3, axis=-1))
    return ArraySource(rgb, d.target[keep[split]], f"digits {split}")


def open_source(src: str, split: str | None = None):
    """`digits`, a CIFAR-10 or STL-10 folder as torchvision downloads it (or its parent), or an ImageFolder tree."""
    if src == "digits":
        return digits(split or "train")
    path = Path(src)
    if not path.exists():
        raise DataError(f"source not found: {src}")
    if not path.is_dir():
        raise DataError(f"source is not a folder (nor 'digits'): {src}")
    for folder in (path / "cifar-10-batches-py", path):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return _cifar10(folder, split or "train")
    for folder in (path / "stl10_binary", path):
        if (folder / "train_X.bin").is_file():
            return _stl10(folder, split or "train")
    if split is not None:
        raise DataError("--split applies to CIFAR-10, STL-10 and digits; for an ImageFolder pass the split's folder")
    source = ImageFolderSource(path)
    if not source.classes:
        raise DataError(f"no class folders in {src} (expected SRC/<class>/<image>)")
    return source
