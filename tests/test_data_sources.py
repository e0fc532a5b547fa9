"""The writer's sources read CIFAR-10 and STL-10 in the exact on-disk layouts torchvision downloads."""

import pickle

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
