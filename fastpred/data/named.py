"""The data sets a run names instead of a path (`--data digits`, `--data fashion-mnist`): where each one's images
come from, and its train and test splits written once to cached .beton files, shared by the trainer and
`python -m fastpred.eval`. The cache is $FASTPRED_CACHE, else ~/.cache/fastpred."""

from __future__ import annotations

import os
from pathlib import Path

from fastpred.core.distributed import barrier
from fastpred.data.errors import DataError


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
    barrier(f"process 0's write of the {named.title} cache")
    return paths


def digits_betons(rank: int = 0) -> tuple[Path, Path]:
    """The embedded digits as train and test .beton files in the cache."""
    return named_betons("digits", rank)
