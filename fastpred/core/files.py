"""Files written so that a crash, a kill or a full disk leaves the previous version whole, and files from elsewhere
read as data, never code: the run folder (`fastpred.train.run_dir`) and the evaluations' results and states
(`fastpred.eval`) are written and read through these."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch


class WriteError(RuntimeError):
    """A file could not be written (disk full, no permission): the CLIs print it as one line (the trainer exits
    with code 4). The file being written is left as it was: atomic writes remove their temporary file."""


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file in the same folder, synced and renamed over
    `path` once the block succeeds (readers see the old or the new file, never half of one), removed if not."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """`data` as the whole of `path`, atomically; an OSError is one WriteError line."""
    with writing(path):
        with atomic_file(path) as f:
            f.write(data)


@contextlib.contextmanager
def writing(path: str | os.PathLike, note: str = "") -> Iterator[None]:
    """Turn an OSError while writing `path` into one WriteError line (`note` follows the reason)."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}{note}") from None


def load_data(path: str | os.PathLike, error: type[Exception], what: str = ""):
    """torch.load of a file from elsewhere as data, never code (``weights_only=True``), on the CPU; any failure is
    one line of `error`: "cannot read {what}{path}: <first line of the reason>"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling raises many types for a damaged or foreign file
        raise error(f"cannot read {what}{path}: {str(e).splitlines()[0]}") from None
