"""fastpred.data.beton: a .beton's tables read with numpy alone, equal to FFCV's Reader's, with one-line errors for
damaged files, and the device-resident path reading a .beton without importing FFCV."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fastpred.data.beton import ALLOCATION, FIELD_DESCRIPTOR, HEADER, read_tables
from fastpred.data.errors import DataError
from fastpred.data.sources import ArraySource
from fastpred.data.write import write_beton

pytest.importorskip("ffcv")


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    d = tmp_path_factory.mktemp("beton")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (40, 12, 12, 3), dtype=np.uint8), np.arange(40) % 7
    out = {}
    for name, p in (("raw", 0.0), ("jpg", 1.0), ("mixed", 0.5)):
        out[name] = d / f"{name}.beton"
        write_beton(ArraySource(images, labels, name), out[name], compress_probability=p, workers=1)
    return out


@pytest.mark.parametrize("kind", ["raw", "jpg", "mixed"])
def test_tables_are_ffcvs(betons, kind):
    from ffcv.reader import Reader

    tables, reader = read_tables(betons[kind]), Reader(str(betons[kind]))
    assert tables.num_samples == reader.num_samples == 40 and tables.page_size == reader.page_size
    assert tables.kinds == {name: type(h).__name__ for name, h in reader.handlers.items()}
    assert tables.metadata.dtype == reader.metadata.dtype
    assert np.array_equal(tables.metadata, reader.metadata) and np.array_equal(tables.alloc_table, reader.alloc_table)
    assert tables.metadata[tables.column("label")].tolist() == (np.arange(40) % 7).tolist()


def _damaged(src, dst, offset: int, data: bytes | None = None, size: int | None = None):
    blob = bytearray(src.read_bytes())
    if data is not None:
        blob[offset:offset + len(data)] = data
    dst.write_bytes(bytes(blob[:size] if size is not None else blob))
    return dst


def test_damaged_files_are_one_line_errors(betons, tmp_path):
    good = betons["raw"]
    header = np.fromfile(good, dtype=HEADER, count=1)[0]
    alloc_ptr = int(header["alloc_table_ptr"])
    cases = [
        (_damaged(good, tmp_path / "short.beton", 0, size=HEADER.itemsize - 1), "not a .beton"),
        (_damaged(good, tmp_path / "version.beton", 0, np.array([3], "<u2").tobytes()), "not a .beton"),
        (_damaged(good, tmp_path / "cut.beton", 0, size=alloc_ptr - 1), "not a .beton"),  # pointer past the end
        (_damaged(good, tmp_path / "ragged.beton", 0, size=alloc_ptr + ALLOCATION.itemsize + 5), "cut short"),
        (_damaged(good, tmp_path / "many.beton", HEADER.fields["num_samples"][1],
                  np.array([10**6], "<u8").tobytes()), "metadata for 1000000 samples"),
        (_damaged(good, tmp_path / "kind.beton", HEADER.itemsize, bytes([4])), "NDArrayField"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=message) as e:
            read_tables(path)
        assert "\n" not in str(e.value)
    assert FIELD_DESCRIPTOR.itemsize > 1024  # the descriptor's arguments are skipped, not parsed


def test_resident_path_reads_a_beton_without_ffcv(betons):
    # In a fresh interpreter: validation and the resident path's read never import FFCV (seconds of numba work, and
    # absent on machines without its system libraries).
    code = (
        "import sys\nfrom fastpred.data.resident import read_set\n"
        f"images, labels = read_set({str(betons['mixed'])!r})\n"
        "assert tuple(images.shape) == (40, 3, 12, 12) and labels.tolist()[:8] == [0, 1, 2, 3, 4, 5, 6, 0]\n"
        "print(sorted(m for m in sys.modules if m == 'ffcv' or m.startswith('ffcv.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
