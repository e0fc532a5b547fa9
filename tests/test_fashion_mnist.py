"""MNIST-family IDX files and `--data fashion-mnist`: the reader on subsets of the real Fashion-MNIST files (gzip
and plain, both file-name spellings), every malformed file as one DataError, the named source's cache (keyed by
the source files, written once), the missing-package line, and short trainer and evaluation runs on a subset."""

import gzip
import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpred.data import DataError
from fastpred.data.idx import read_idx
from fastpred.data.sources import open_source

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not in {FASHION} (apt-get install -y dataset-fashion-mnist)",
)
SUBSET = {"train": 2000, "test": 500}


def _idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """An IDX file: two zero bytes, the type code, the rank, big-endian uint32 dimensions, then the values."""
    return bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write(path: Path, content: bytes, gzipped: bool) -> None:
    path.write_bytes(gzip.compress(content, compresslevel=1) if gzipped else content)


def _write_folder(folder: Path, data: dict, *, gzipped: bool, spelling: str = "{p}-{k}-{i}-ubyte") -> Path:
    """data: split -> (images (N, H, W), labels (N,)), written under the MNIST family's file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in data.items():
        prefix = {"train": "train", "test": "t10k"}[split]
        for kind, idx, array in (("images", "idx3", images), ("labels", "idx1", labels)):
            name = spelling.format(p=prefix, k=kind, i=idx) + (".gz" if gzipped else "")
            _write(folder / name, _idx_bytes(array), gzipped)
    return folder


@pytest.fixture(scope="module")
def real_subset():
    """The first 2,000 train and 500 test images and labels of the real files (read once per module)."""
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not in {FASHION} (apt-get install -y dataset-fashion-mnist)")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz", 3)[: SUBSET[split]]
        labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz", 1)[: SUBSET[split]]
        out[split] = (np.ascontiguousarray(images), np.ascontiguousarray(labels))
    return out


@pytest.fixture(scope="module")
def subset_dir(real_subset, tmp_path_factory):
    """The subset as a gzipped folder under the standard names: FASHION_MNIST_DIR for the named-source tests."""
    return _write_folder(tmp_path_factory.mktemp("fashion-subset"), real_subset, gzipped=True)


@needs_fashion
@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("spelling", ["{p}-{k}-{i}-ubyte", "{p}-{k}.{i}-ubyte"])
def test_reader_on_a_real_subset(real_subset, tmp_path, gzipped, spelling):
    folder = _write_folder(tmp_path / "f", real_subset, gzipped=gzipped, spelling=spelling)
    for split in ("train", "test"):
        source = open_source(str(folder), split)
        images, labels = real_subset[split]
        assert len(source) == SUBSET[split] and images.shape[1:] == (28, 28)
        for i in (0, 1, SUBSET[split] - 1):
            image, label = source[i]
            assert image.shape == (28, 28, 3) and image.dtype == np.uint8 and label == labels[i]
            assert all(np.array_equal(image[..., c], images[i]) for c in range(3))  # grey in three equal channels
    assert np.bincount(real_subset["test"][1], minlength=10).min() > 0  # every class is in the subset
    assert len(open_source(str(folder))) == SUBSET["train"]  # train is the default split


def test_gzip_is_told_by_its_magic_not_its_name(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain.gz").write_bytes(_idx_bytes(images))
    (tmp_path / "zipped").write_bytes(gzip.compress(_idx_bytes(images)))
    assert np.array_equal(read_idx(tmp_path / "plain.gz", 3), images)
    assert np.array_equal(read_idx(tmp_path / "zipped", 3), images)


def _small(n_images: int = 6, n_labels: int = 6) -> dict:
    rng = np.random.default_rng(0)
    return {"train": (rng.integers(0, 256, (n_images, 5, 4), dtype=np.uint8),
                      rng.integers(0, 10, n_labels, dtype=np.uint8))}


def _damage(folder: Path, case: str, gzipped: bool) -> None:
    images_path = next(folder.glob("train-images*"))
    content = gzip.decompress(images_path.read_bytes()) if gzipped else images_path.read_bytes()
    if case == "truncated":
        content = content[:-7]
    elif case == "longer":
        content += b"\0"
    elif case == "magic":
        content = b"\x89PNG" + content[4:]
    elif case == "dtype":  # 0x0D is IDX's float32
        content = content[:2] + b"\x0d" + content[3:]
    elif case == "rank2":  # a (30, 4) images file: the same bytes, but two dimensions
        content = _idx_bytes(np.zeros((30, 4), dtype=np.uint8))
    _write(images_path, content, gzipped)


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("case, says", [
    ("truncated", "truncated"),
    ("longer", "longer than its header says"),
    ("magic", "not an IDX file"),
    ("dtype", "IDX type 0x0d"),
    ("rank2", "has 2 dimensions; images (N, H, W) need 3"),
])
def test_malformed_files_are_one_data_error(tmp_path, gzipped, case, says):
    folder = _write_folder(tmp_path / "f", _small(), gzipped=gzipped)
    _damage(folder, case, gzipped)
    with pytest.raises(DataError, match="^[^\n]*" + says.replace("(", r"\(").replace(")", r"\)")):
        open_source(str(folder), "train")


def test_count_mismatch_and_missing_files(tmp_path):
    folder = _write_folder(tmp_path / "f", _small(6, 5), gzipped=True)
    with pytest.raises(DataError, match="holds 6 images but .* 5 labels"):
        open_source(str(folder), "train")
    with pytest.raises(DataError, match=r"has no t10k-images-idx3-ubyte\[\.gz\]"):
        open_source(str(folder), "test")
    with pytest.raises(DataError, match="splits train and test, not 'unlabeled'"):
        open_source(str(folder), "unlabeled")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"has no train-labels-idx1-ubyte\[\.gz\]"):
        open_source(str(folder), "train")


@pytest.mark.parametrize("gzipped", [True, False])
def test_a_header_that_lies_allocates_only_what_the_file_holds(tmp_path, gzipped):
    # The header promises 65535 x 255 x 255 images (4.3 GB); the file holds 100 bytes of them.
    path = tmp_path / "big"
    _write(path, bytes([0, 0, 8, 3]) + struct.pack(">3I", 65535, 255, 255) + bytes(100), gzipped)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="truncated"):
            read_idx(path, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # gzip is read in 1 MiB pieces, a plain file is measured before it is read


@needs_fashion
def test_write_cli_test_split_of_an_idx_folder(real_subset, tmp_path, capsys):
    pytest.importorskip("ffcv", reason="writing a .beton needs fastpred[data]")
    from fastpred.data.loader import check_beton
    from fastpred.data.write import main as write_main

    folder = _write_folder(tmp_path / "f", real_subset, gzipped=False)
    out = tmp_path / "test.beton"
    assert write_main([str(folder), str(out), "--split", "test", "--compress-probability", "0", "--workers", "1"]) == 0
    assert check_beton(out, {"image": "RGBImageField", "label": "IntField"}) == SUBSET["test"]
    bad = _write_folder(tmp_path / "bad", _small(6, 5), gzipped=True)
    assert write_main([str(bad), str(tmp_path / "bad.beton")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "5 labels" in err[0], err
    assert not (tmp_path / "bad.beton").exists()


@needs_fashion
def test_named_source_cache_is_keyed_by_its_files(subset_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ffcv", reason="writing a .beton needs fastpred[data]")
    from fastpred.data.loader import check_beton
    from fastpred.data.named import NAMED_SOURCES, _cache_key, named_betons

    monkeypatch.setenv("FASTPRED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(subset_dir))
    train, test = named_betons("fashion-mnist")
    assert "writing Fashion-MNIST (train)" in capsys.readouterr().out
    fields = {"image": "RGBImageField", "label": "IntField"}
    assert (check_beton(train, fields), check_beton(test, fields)) == (SUBSET["train"], SUBSET["test"])
    stamps = train.stat().st_mtime_ns, test.stat().st_mtime_ns
    assert named_betons("fashion-mnist") == (train, test)  # the second time: reused, not written again
    assert (train.stat().st_mtime_ns, test.stat().st_mtime_ns) == stamps and "writing" not in capsys.readouterr().out
    subset_key = _cache_key(NAMED_SOURCES["fashion-mnist"].files())
    assert subset_key and subset_key in train.name and subset_key in test.name
    monkeypatch.setenv("FASHION_MNIST_DIR", str(FASHION))  # the full set: other files, another key
    full_key = _cache_key(NAMED_SOURCES["fashion-mnist"].files())
    assert full_key and full_key != subset_key
    copy = shutil.copytree(subset_dir, tmp_path / "copy")  # the same names, a newer copy of the files: a new key
    (copy / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(SUBSET["test"], np.uint8))))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(copy))
    assert _cache_key(NAMED_SOURCES["fashion-mnist"].files()) not in (subset_key, full_key)


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_missing_package_is_one_line(tmp_path, monkeypatch, capsys, where):
    from fastpred.train.__main__ import main as train_main

    folder = tmp_path / "fashion"
    if where == "empty":
        folder.mkdir()
    monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
    monkeypatch.setenv("FASTPRED_CACHE", str(tmp_path / "cache"))
    assert train_main(["--data", "fashion-mnist", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Fashion-MNIST not found"), err
    assert "apt-get install -y dataset-fashion-mnist" in err[0] and "FASHION_MNIST_DIR" in err[0]
    assert str(folder) in err[0] and not (tmp_path / "run").exists()


def test_val_with_a_named_source_is_an_error(capsys):
    from fastpred.train.__main__ import main as train_main

    assert train_main(["--data", "fashion-mnist", "--val", "x.beton"]) == 2
    assert "--val applies only with --data PATH.beton" in capsys.readouterr().err


@needs_fashion
def test_short_run_and_eval_on_the_subset(subset_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ffcv", reason="the trainer's data path needs fastpred[data]")
    from fastpred.eval.__main__ import main as eval_main
    from fastpred.train.__main__ import main as train_main

    monkeypatch.setenv("FASTPRED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(subset_dir))
    threads = torch.get_num_threads()
    run = tmp_path / "run"
    argv = ["--data", "fashion-mnist", "--max-steps", "4", "--final-probe-epochs", "2", "--knn-every", "0",
            "--proj-dim", "16", "--resolution", "16", "--progress", "plain", "--out", str(run)]
    try:
        assert train_main(argv) == 0
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 4 and str(subset_dir) in summary["held_out"]
        for key in ("linear_probe_acc", "linear_probe_acc_random_init", "knn_acc"):
            assert 0.0 <= summary[key] <= 1.0, summary  # None would fail: the probes ran on the test split
        assert eval_main([str(run), "--data", "fashion-mnist"]) == 0
        result = json.loads((run / "eval-knn.json").read_text())
        assert result["val"]["images"] == SUBSET["test"] and result["train"]["images"] == SUBSET["train"]
        assert result["top1"] == pytest.approx(summary["knn_acc"], abs=0.02)  # the same sets as the trainer's kNN
        capsys.readouterr()
        assert eval_main([str(run), "--data", "fashion-mnist", "--val", "x.beton"]) == 2
        assert "--val goes with --data TRAIN.beton" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)  # FFCV sets torch's thread count to its worker count
