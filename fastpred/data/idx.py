"""The MNIST family's IDX files (MNIST, Fashion-MNIST, KMNIST): images `idx3`, labels `idx1`, gzipped or not.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian uint32 per
dimension, then the values in C order. The MNIST family uses type 0x08 (unsigned byte) only, which is all that is
read here. Whether a file is gzipped is decided by its first two bytes, not its name: mirrors unpack the files but
keep the `.gz` name, or the other way round.

Grey images are stored as three equal channels, raw: the whole pipeline is RGB (FFCV's RGBImageField, the fused
colour kernel, the normalisation, the backbones' 3-channel stems), and a one-channel path through all of it would
save 1,568 bytes per 28x28 image (94 MB over 60,000, a file the page cache holds either way) at the cost of a second
decoder, kernel and stem to keep correct. Raw, not JPEG: at 28x28 the 8x8 JPEG blocks are a sizeable part of the
image, and a raw image is a copy to decode.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from fastpred.data.errors import DataError

UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one the MNIST family uses
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20  # gzip is read in pieces, so a header that lies about its size cannot make us allocate it
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# The standard names (`train-images-idx3-ubyte`) and the spelling with a dot that some mirrors use
# (`train-images.idx3-ubyte`), each plain or gzipped; the first that exists is read.
_SPELLINGS = ("{prefix}-{kind}-{idx}-ubyte", "{prefix}-{kind}.{idx}-ubyte")


def _read_exact(f, n: int, path: Path) -> bytes:
    """n bytes, never more; a short read is a truncated file."""
    parts, left = [], n
    while left:
        part = f.read(min(left, _CHUNK))
        if not part:
            raise DataError(f"truncated IDX file {path}: {n - left} of the {n} bytes its header promises")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_idx(path: str | os.PathLike, rank: int) -> np.ndarray:
    """The uint8 array of an IDX file with `rank` dimensions (3: images (N, H, W); 1: labels (N,)), checked."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            size = None if gzipped else os.fstat(raw.fileno()).st_size
            f = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
            try:
                return _parse(f, path, rank, size)
            except (OSError, EOFError, zlib.error) as e:  # gzip's own damage: a bad header, CRC or deflate stream
                raise DataError(f"truncated or damaged gzip file {path}: {e}") from None
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not an IDX file") from None
    except PermissionError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _parse(f, path: Path, rank: int, size: int | None) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0":
        raise DataError(f"not an IDX file: {path} (its magic is {magic.hex() or 'empty'}, expected 0000xxyy)")
    dtype, ndim = magic[2], magic[3]
    if dtype != UBYTE:
        raise DataError(f"{path} holds IDX type 0x{dtype:02x}; the MNIST family's files are unsigned bytes (0x08)")
    if ndim != rank:
        what = {3: "images (N, H, W)", 1: "labels (N,)"}[rank]
        raise DataError(f"{path} has {ndim} dimensions; {what} need {rank}")
    shape = struct.unpack(f">{rank}I", _read_exact(f, 4 * rank, path))
    count = math.prod(shape)  # a Python int: three uint32 dimensions can overflow int64
    if rank == 3 and 0 in shape[1:]:
        raise DataError(f"{path} holds images of {shape[1]}x{shape[2]} pixels")
    header = 4 + 4 * rank
    if size is not None and size - header != count:  # a plain file: its size says it all before anything is read
        short = "truncated IDX file" if size - header < count else "IDX file longer than its header says"
        raise DataError(f"{short} {path}: {size - header} bytes of values for a {'x'.join(map(str, shape))} array")
    data = _read_exact(f, count, path)
    if size is None and f.read(1):
        raise DataError(f"IDX file longer than its header says {path}: more than the {count} bytes of a "
                        f"{'x'.join(map(str, shape))} array")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def idx_file(folder: Path, split: str, kind: str) -> Path | None:
    """The file of `kind` ('images' or 'labels') for `split` in an MNIST-family folder, or None if it has none."""
    idx = "idx3" if kind == "images" else "idx1"
    for spelling in _SPELLINGS:
        name = spelling.format(prefix=SPLIT_PREFIX[split], kind=kind, idx=idx)
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def is_idx_folder(folder: Path) -> bool:
    """Whether a folder holds MNIST-family images for either split."""
    return any(idx_file(folder, split, "images") for split in SPLIT_PREFIX)


def idx_files(folder: Path, split: str) -> tuple[Path, Path]:
    """The images and labels files of `split`, or a DataError naming the first that is missing."""
    if split not in SPLIT_PREFIX:
        raise DataError(f"an MNIST-family folder has splits {' and '.join(SPLIT_PREFIX)}, not {split!r}")
    found = []
    for kind, idx in (("images", "idx3"), ("labels", "idx1")):
        path = idx_file(folder, split, kind)
        if path is None:
            raise DataError(f"{folder} has no {SPLIT_PREFIX[split]}-{kind}-{idx}-ubyte[.gz] (the {split} {kind})")
        found.append(path)
    return found[0], found[1]


class GreySource:
    """Grey images (N, H, W) uint8 and (N,) labels, served as (H, W, 3) RGB with three equal channels (see the
    module's docstring for why); the grey array is all that is held, so 60,000 28x28 images take 47 MB, not 141."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        assert images.ndim == 3 and images.dtype == np.uint8 and len(images) == len(labels), images.shape
        self.images, self.labels, self.name = images, np.asarray(labels, dtype=np.int64), name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.repeat(self.images[i][..., None], 3, axis=-1), int(self.labels[i])

    def max_pixels(self) -> int:
        return int(self.images.shape[1]) * int(self.images.shape[2])


def idx_source(folder: str | os.PathLike, split: str = "train") -> GreySource:
    """One split of an MNIST-family folder (MNIST, Fashion-MNIST, KMNIST) as a writer source."""
    folder = Path(folder)
    images_path, labels_path = idx_files(folder, split)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    return GreySource(images, labels, f"{folder} ({split}, IDX)")
