"""The writer's sources read CIFAR-10 and STL-10 in the exact on-disk layouts torchvision downloads."""

import io
import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import pytest

from fastpred.data import DataError
from fastpred.data.sources import open_source


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # (N, H, W, C)


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = _images(10, 32, 0)
    labels = list(range(10))
    for k in range(5):  # CIFAR stores rows of 3072 bytes: the R plane, then G, then B, each row-major
        chunk = train[2 * k : 2 * k + 2]
        batch = {"data": chunk.transpose(0, 3, 1, 2).reshape(2, 3072), "labels": labels[2 * k : 2 * k + 2]}
        (folder / f"data_batch_{k + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    test = _images(3, 32, 1)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": test.transpose(0, 3, 1, 2).reshape(3, 3072),
                                                      "labels": [7, 8, 9]}))
    source = open_source(str(tmp_path))  # the parent folder, as passed to torchvision's root
    assert len(source) == 10
    for i in range(10):
        image, label = source[i]
        assert np.array_equal(image, train[i]) and label == i
    test_source = open_source(str(folder), split="test")
    assert [test_source[i][1] for i in range(3)] == [7, 8, 9]
    assert np.array_equal(test_source[2][0], test[2])
    with pytest.raises(DataError, match="CIFAR-10 has splits"):
        open_source(str(tmp_path), split="unlabeled")


def test_stl10_binary(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    train, unlabeled = _images(4, 96, 2), _images(2, 96, 3)
    # STL-10 stores each image channel by channel, column-major: (N, C, W, H) in C order.
    train.transpose(0, 3, 2, 1).tofile(folder / "train_X.bin")
    np.array([1, 10, 3, 4], dtype=np.uint8).tofile(folder / "train_y.bin")  # labels are 1-based on disk
    unlabeled.transpose(0, 3, 2, 1).tofile(folder / "unlabeled_X.bin")
    source = open_source(str(tmp_path))
    assert [source[i][1] for i in range(4)] == [0, 9, 2, 3]
    assert all(np.array_equal(source[i][0], train[i]) for i in range(4))
    both = open_source(str(folder), split="train+unlabeled")
    assert len(both) == 6 and both[5][1] == -1 and np.array_equal(both[5][0], unlabeled[1])


class Py2Pickler(pickle._Pickler):
    """Writes a pickle the way Python 2's cPickle wrote CIFAR-10's python batches (protocol 2): str (bytes to
    Python 3) as BINSTRING opcodes, and numpy's functions under numpy 1's module names."""

    dispatch = dict(pickle._Pickler.dispatch)
    NUMPY_1 = {np.ndarray: b"numpy\nndarray\n", np.dtype: b"numpy\ndtype\n",
               np.empty(0).__reduce__()[0]: b"numpy.core.multiarray\n_reconstruct\n"}

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        short = n < 256
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if short else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj not in self.NUMPY_1:
            raise AssertionError(f"a CIFAR-10 batch holds no {obj!r}")
        self.write(pickle.GLOBAL + self.NUMPY_1[obj])
        self.memoize(obj)


def py2_batch(images: np.ndarray, labels: list[int], name: bytes) -> bytes:
    batch = {b"batch_label": name, b"labels": labels, b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
             b"filenames": [b"img_%d.png" % i for i in range(len(images))]}
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(batch)
    return f.getvalue()


def test_cifar10_as_python2_wrote_it(tmp_path):
    """The real files' format; it calls numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype only."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = _images(10, 32, 4)
    for k in range(5):
        blob = py2_batch(images[2 * k : 2 * k + 2], [k, 9 - k], b"training batch %d of 5" % (k + 1))
        (folder / f"data_batch_{k + 1}").write_bytes(blob)
    (folder / "test_batch").write_bytes(py2_batch(images[:3], [1, 2, 3], b"testing batch 1 of 1"))
    calls = {arg for op, arg, _ in pickletools.genops((folder / "data_batch_1").read_bytes()) if op.name == "GLOBAL"}
    assert calls == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    source = open_source(str(tmp_path))
    assert [source[i][1] for i in range(10)] == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    assert all(np.array_equal(source[i][0], images[i]) for i in range(10))
    # Pickled again by Python 3: bytes keys, protocols 2 (bytes through _codecs.encode) to 5 (arrays by buffer).
    for protocol in (2, 4, 5):
        batch = {b"data": images[:3].transpose(0, 3, 1, 2).reshape(3, 3072), b"labels": [4, 5, 6]}
        (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
        test = open_source(str(folder), split="test")
        assert [test[i][1] for i in range(3)] == [4, 5, 6] and np.array_equal(test[2][0], images[2])


class Payload:
    """Runs `call(*args)` when unpickled, as a malicious batch would."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _payloads(marker: Path) -> list:
    return [
        Payload(os.system, f"touch {marker}"),
        Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        # numpy, but not a plain array: a masked array's own rebuilder, and an object array (whose elements would
        # be unpickled one by one).
        {"data": np.ma.masked_array(np.zeros((1, 3072), np.uint8)), "labels": [0]},
        {"data": np.array([Payload(os.system, f"touch {marker}")], dtype=object), "labels": [0]},
    ]


@pytest.mark.parametrize("k", range(4))
def test_cifar10_pickle_that_runs_code_is_refused(tmp_path, k):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, protocol=2)
    for name in ["data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (folder / name).write_bytes(good)
    marker = tmp_path / "payload_ran"
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": _payloads(marker)[k], "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="refusing to read .*data_batch_1: not a plain CIFAR-10 batch") as e:
        open_source(str(tmp_path))
    assert not marker.exists(), "the payload ran"
    assert "nothing in it was run" in str(e.value)
    if k < 2:  # the same bytes do run with pickle.load: the test would see a payload that ran
        pickle.loads((folder / "data_batch_1").read_bytes())
        assert marker.exists()


def test_cifar10_refusal_is_one_error_line(tmp_path, capsys):
    from fastpred.data.write import main

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "payload_ran"
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": Payload(os.system, f"touch {marker}")}))
    assert main([str(tmp_path), str(tmp_path / "c.beton")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: refusing to read ") and "it calls posix.system" in err[0], err
    assert not marker.exists() and not (tmp_path / "c.beton").exists()


@pytest.mark.parametrize("content,message", [
    (b"\x80\x02}q\x01(", "cannot read CIFAR-10 batch"),
    (pickle.dumps([1, 2, 3]), "holds a list, not a dict"),
    (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), "no uint8 \\(N, 3072\\) 'data'"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "needs 2 integer 'labels'"),
])
def test_cifar10_damaged_batch_is_a_data_error(tmp_path, content, message):
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        open_source(str(tmp_path))


def test_cifar10_labels_as_numpy_scalars(tmp_path):
    """A batch re-pickled from numpy keeps its labels as numpy integers: numpy's scalar(dtype, bytes), under numpy
    2's module name and numpy 1's, is plain data and is read; a scalar built from anything but bytes is refused."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = _images(3, 32, 5)
    for k in range(1, 6):  # the training batches, plain
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}))
    labels = [np.int64(7), np.int32(8), np.uint8(9)]
    blob = pickle.dumps({"data": images.transpose(0, 3, 1, 2).reshape(3, 3072), "labels": labels}, protocol=2)
    calls = {arg for op, arg, _ in pickletools.genops(blob) if op.name == "GLOBAL"}
    assert "numpy._core.multiarray scalar" in calls or "numpy.core.multiarray scalar" in calls
    numpy_2 = blob.replace(b"numpy.core.multiarray\nscalar", b"numpy._core.multiarray\nscalar")
    numpy_1 = numpy_2.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
    for spelling in (numpy_1, numpy_2):
        (folder / "test_batch").write_bytes(spelling)
        test = open_source(str(folder), split="test")
        assert [test[i][1] for i in range(3)] == [7, 8, 9] and np.array_equal(test[1][0], images[1])
    scalar = np.int64(0).__reduce__()[0]
    odd = {"data": images[:1].transpose(0, 3, 1, 2).reshape(1, 3072), "labels": [Payload(scalar, np.dtype(int), 7)]}
    (folder / "test_batch").write_bytes(pickle.dumps(odd, protocol=2))
    with pytest.raises(DataError, match="not a plain CIFAR-10 batch .*a numpy scalar that is not plain data"):
        open_source(str(folder), split="test")
