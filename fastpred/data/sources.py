"""Indexable image sources for the .beton writer: ImageFolder trees, torchvision's CIFAR-10 / STL-10 folders,
MNIST-family IDX folders (`fastpred.data.idx`) and scikit-learn's 8x8 digits. Each source yields `(image, label)`
with image a uint8 (H, W, 3) array."""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path

import numpy as np

from fastpred.data.errors import DataError
from fastpred.data.idx import idx_source, is_idx_folder

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

    def max_pixels(self) -> int:
        """H x W of the largest image (the writer sizes its pages by it when images are kept at full size)."""
        return int(self.images.shape[1]) * int(self.images.shape[2])


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

    def max_pixels(self) -> int:
        """H x W of the largest image, from the file headers (unreadable files count 0: reading them fails later)."""
        from PIL import Image

        largest = 0
        for path, _ in self.samples:
            try:
                with Image.open(path) as im:
                    largest = max(largest, im.width * im.height)
            except Exception:  # noqa: BLE001, S112 - the writer reports the file when it reads it
                continue
        return largest


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something a CIFAR-10 batch never holds."""


def _plain_dtype(*args) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:  # an object array would unpickle its elements as arbitrary objects
        raise _Refused("an object dtype")
    return dtype


_scalar = np.int64(0).__reduce__()[0]  # numpy's scalar constructor, wherever this numpy version keeps it


def _plain_scalar(dtype, data=None):
    """A numpy scalar (a label a batch re-pickled from numpy kept as np.int64) from its dtype and raw bytes (a str
    of latin-1 characters in a pickle Python 2 wrote)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes | str):
        # An object scalar is built from an arbitrary unpickled object rather than from bytes.
        raise _Refused("a numpy scalar that is not plain data")
    return _scalar(dtype, data)


def _latin1_bytes(text: str, encoding: str) -> bytes:
    if encoding != "latin1":  # Python 3's protocol 2 spells bytes as _codecs.encode(text, "latin1"), nothing else
        raise _Refused(f"_codecs.encode(..., {encoding!r})")
    return codecs.encode(text, "latin1")


# Everything a CIFAR-10 python batch may call while unpickling, by the (module, name) the pickle spells.
# Python 2's cPickle wrote the real files: a dict of str, list, int and one uint8 ndarray, which needs numpy's
# ndarray, dtype and _reconstruct (under numpy 1's `numpy.core`; numpy 2 keeps it in `numpy._core`). A batch
# pickled again by Python 3 needs _codecs.encode for bytes (protocol 2) or _frombuffer for arrays (protocol 5);
# one whose labels were numpy integers needs numpy's scalar(dtype, bytes), plain data as dtype is.
_reconstruct = np.empty(0).__reduce__()[0]  # numpy's own functions, wherever this numpy version keeps them
_frombuffer = np.empty(0).__reduce_ex__(5)[0]
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.multiarray", "scalar"): _plain_scalar,
    ("numpy._core.multiarray", "scalar"): _plain_scalar,
    ("_codecs", "encode"): _latin1_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: a pickle that calls anything else is refused, not run."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"it calls {module}.{name}") from None


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as uint8 (N, 32, 32, 3) images and int64 (N,) labels, without running its code."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise DataError(f"refusing to read {path}: not a plain CIFAR-10 batch ({e}); nothing in it was run") from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways, each one line to the user
        raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"not a CIFAR-10 batch: {path} holds a {type(d).__name__}, not a dict")
    # Python 2 str keys load as str with encoding="latin1"; a batch pickled again by Python 3 may have bytes keys.
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    data, labels = d.get("data"), d.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"not a CIFAR-10 batch: {path} has no uint8 (N, 3072) 'data'")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.shape != (len(data),):
        raise DataError(f"not a CIFAR-10 batch: {path} needs {len(data)} integer 'labels'")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar10(folder: Path, split: str) -> ArraySource:
    names = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
    if split not in names:
        raise DataError(f"CIFAR-10 has splits train and test, not {split!r}")
    xs, ys = zip(*(read_cifar_batch(folder / n) for n in names[split]), strict=True)
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
    """`digits`, a CIFAR-10 or STL-10 folder as torchvision downloads it (or its parent), a folder of the MNIST
    family's IDX files (MNIST, Fashion-MNIST, KMNIST), or an ImageFolder tree."""
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
    if is_idx_folder(path):
        return idx_source(path, split or "train")
    if split is not None:
        raise DataError("--split applies to CIFAR-10, STL-10, MNIST-family (IDX) folders and digits; for an "
                        "ImageFolder pass the split's folder")
    source = ImageFolderSource(path)
    if not source.classes:
        raise DataError(f"no class folders in {src} (expected SRC/<class>/<image>)")
    return source
