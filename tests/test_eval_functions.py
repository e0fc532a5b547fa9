"""fastpred.eval's functions: sharding, feature extraction, kNN and the cached-feature probe, in one process and
over two gloo processes (each holding its shard) against one process holding everything."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastpred.core import distributed as collective
from fastpred.eval import extract_features, knn_accuracy, linear_probe_accuracy, linear_probe_scores, shard_range
from fastpred.eval.knn import knn_votes

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many tiny ops: see conftest.py


def _digits(seed: int = 0):
    """sklearn's 8x8 digits, raw pixels as features, split 1347 / 450 by a fixed permutation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:1347], perm[1347:]
    return x[train], y[train], x[test], y[test]


def _blobs(n: int, dim: int = 16, classes: int = 4, seed: int = 0, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.randint(classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


# --- sharding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 255, 256, 257, 1437])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("align", [1, 256])
def test_shards_are_disjoint_aligned_and_cover_everything(n, world, align):
    ranges = [shard_range(n, r, world, align) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (lo, hi), (next_lo, _) in zip(ranges, ranges[1:], strict=False):
        assert lo <= hi == next_lo  # contiguous, in rank order: each row once
    assert all(lo % align == 0 for lo, hi in ranges if hi > lo)
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= align  # balanced to a block


# --- feature extraction ------------------------------------------------------------------------------------


def _preprocess(x):
    return x.float() / 255 - 0.5


def test_extract_features_eval_mode_restores_modes_and_stays_on_the_device():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())
    backbone.train()
    backbone[2].eval()  # a mixed state must come back as it was
    # Eval mode: BatchNorm uses running statistics and the outputs are per sample, so a batch split
    # differently gives the same features; training mode would not.
    images = torch.randint(0, 256, (10, 3, 6, 6), dtype=torch.uint8)
    labels = torch.arange(10)
    batches = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    feats, out_labels = extract_features(backbone, batches, _preprocess, "cpu")
    assert feats.shape == (10, 64) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert torch.equal(out_labels, labels) and out_labels.dtype == torch.int64
    whole, _ = extract_features(backbone, [(images, labels)], _preprocess, "cpu")
    torch.testing.assert_close(feats, whole)
    assert [m.training for m in backbone] == [True, True, False, True]
    assert not feats.requires_grad
    with pytest.raises(ValueError, match="no batches"):
        extract_features(backbone, [], _preprocess, "cpu")
    empty, empty_labels = extract_features(backbone, [], _preprocess, "cpu", feat_dim=64)
    assert empty.shape == (0, 64) and empty_labels.shape == (0,)


class _RingLoader:
    """Like FFCV on the CPU: every batch is a view of one reused buffer, overwritten by the next batch."""

    def __init__(self, images, labels, batch):
        self.images, self.labels, self.batch = images, labels, batch
        self.num_images = len(images)

    def __iter__(self):
        x_buf, y_buf = torch.empty_like(self.images[: self.batch]), torch.empty_like(self.labels[: self.batch])
        for s in range(0, len(self.images), self.batch):
            n = len(self.images[s : s + self.batch])
            x_buf[:n], y_buf[:n] = self.images[s : s + self.batch], self.labels[s : s + self.batch]
            yield x_buf[:n], y_buf[:n]


def test_extract_features_copies_labels_out_of_a_reused_buffer_and_preallocates():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    images = torch.randint(0, 256, (11, 3, 5, 5), dtype=torch.uint8)
    labels = torch.arange(11)
    feats, out_labels = extract_features(backbone, _RingLoader(images, labels, 4), _preprocess, "cpu")
    assert torch.equal(out_labels, labels)  # kept views would read [8, 9, 10, 3, 8, 9, 10, 7, 8, 9, 10]
    expected, _ = extract_features(backbone, [(images, labels)], _preprocess, "cpu")
    torch.testing.assert_close(feats, expected)
    short = _RingLoader(images, labels, 4)
    short.num_images = 12
    with pytest.raises(ValueError, match="11 of the 12"):
        extract_features(backbone, short, _preprocess, "cpu")


# --- kNN ---------------------------------------------------------------------------------------------------


def _knn_reference(train_x, train_y, test_x, k, temperature, num_classes):
    """Per query, written out plainly (on the fp16-rounded unit vectors the bank stores): the oracle."""
    bank = F.normalize(train_x, dim=1).half().float()
    preds = []
    for q in F.normalize(test_x, dim=1).half().float():
        sim = bank @ q
        top = sim.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes)
        for i in top:
            votes[train_y[i]] += torch.exp(sim[i] / temperature)
        preds.append(int(votes.argmax()))
    return preds


def test_knn_one_hot_features_are_perfect_and_shuffled_labels_are_chance():
    torch.manual_seed(0)
    classes = 10
    train_y, test_y = torch.randint(classes, (2000,)), torch.randint(classes, (1000,))
    train_x = F.one_hot(train_y, classes).float() + 0.05 * torch.randn(2000, classes)
    test_x = F.one_hot(test_y, classes).float() + 0.05 * torch.randn(1000, classes)
    assert knn_accuracy(train_x, train_y, test_x, test_y) == 1.0
    shuffled = train_y[torch.randperm(2000)]
    chance = knn_accuracy(train_x, shuffled, test_x, test_y)
    assert 0.05 < chance < 0.16  # 1/10, with ~0.01 standard deviation over 1000 test rows


def test_knn_matches_plain_reference_for_any_chunk_and_block():
    train_x, train_y = _blobs(300, spread=6.0, seed=1)  # overlapping classes: the votes matter
    test_x, test_y = _blobs(57, spread=6.0, seed=2)
    expected = _knn_reference(train_x, train_y, test_x, k=7, temperature=0.1, num_classes=4)
    expected_acc = sum(int(p == t) for p, t in zip(expected, test_y.tolist(), strict=True)) / len(test_y)
    assert 0.3 < expected_acc < 1.0  # neither trivial nor perfect, so a wrong vote would show
    for chunk, block in ((1, 1), (10, 3), (4096, 64), (4096, 256)):
        votes, labels = knn_votes(train_x, train_y, test_x, test_y, k=7, temperature=0.1, chunk=chunk, block=block)
        assert votes.argmax(dim=1).tolist() == expected and torch.equal(labels, test_y)
        assert knn_accuracy(train_x, train_y, test_x, test_y, k=7, temperature=0.1, chunk=chunk,
                            block=block) == expected_acc


def test_knn_ignores_unlabelled_rows():
    train_x, train_y = _blobs(200, seed=1)
    test_x, test_y = _blobs(50, seed=2)
    base = knn_accuracy(train_x, train_y, test_x, test_y, k=5)
    assert base == 1.0
    # Unlabelled bank rows sit exactly on the test rows, with wrong-looking features for any class vote;
    # unlabelled test rows are noise. Counted, either would change the answer.
    bank_x = torch.cat([train_x, test_x])
    bank_y = torch.cat([train_y, torch.full((50,), -1)])
    noisy_x = torch.cat([test_x, torch.randn(30, 16)])
    noisy_y = torch.cat([test_y, torch.full((30,), -1)])
    assert knn_accuracy(bank_x, bank_y, noisy_x, noisy_y, k=5, num_classes=4) == base
    with pytest.raises(ValueError, match="labelled"):
        knn_accuracy(train_x, torch.full((200,), -1), test_x, test_y)


# --- the cached-feature linear probe -----------------------------------------------------------------------


def test_linear_probe_on_digit_pixels_and_on_shuffled_labels():
    x_train, y_train, x_test, y_test = _digits()
    scores = linear_probe_scores(x_train, y_train, x_test, y_test)
    assert scores["top1"] >= 0.95 and scores["top5"] >= scores["top1"]
    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(1))]
    chance = linear_probe_accuracy(x_train, shuffled, x_test, y_test, epochs=20)
    assert chance < 0.2


def test_linear_probe_is_deterministic_ignores_unlabelled_rows_and_leaves_features_alone():
    x_train, y_train, x_test, y_test = _digits(seed=3)
    kw = {"epochs": 20, "seed": 5}
    before = x_train.clone()
    first = linear_probe_accuracy(x_train, y_train, x_test, y_test, **kw)
    assert torch.equal(x_train, before)  # standardised batch by batch, never in place
    assert first == linear_probe_accuracy(x_train, y_train, x_test, y_test, **kw)
    # Unlabelled rows with extreme values would move the standardisation and the fit if they were used.
    junk = 1e3 * torch.randn(40, 64)
    x_train2, y_train2 = torch.cat([junk, x_train]), torch.cat([torch.full((40,), -1), y_train])
    x_test2, y_test2 = torch.cat([x_test, junk]), torch.cat([y_test, torch.full((40,), -7)])
    assert linear_probe_accuracy(x_train2, y_train2, x_test2, y_test2, **kw) == first


def test_linear_probe_works_under_no_grad():
    x_train, y_train = _blobs(200, seed=1)
    x_test, y_test = _blobs(50, seed=2)
    with torch.no_grad():
        assert linear_probe_accuracy(x_train, y_train, x_test, y_test, epochs=5) == 1.0


# --- two processes against one -----------------------------------------------------------------------------

BLOCK = 64  # the kNN bank block and the train shards' alignment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem():
    """Overlapping blobs with duplicated rows (exact ties between identical features) and unlabelled rows."""
    train_x, train_y = _blobs(700, dim=24, classes=6, seed=11, spread=5.0)
    train_x[650:] = train_x[:50]  # duplicates of the same rows: same features, same labels
    train_y[650:] = train_y[:50]
    train_y[::97] = -1
    test_x, test_y = _blobs(333, dim=24, classes=6, seed=12, spread=5.0)
    test_y[::50] = -1
    return train_x, train_y, test_x, test_y


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    _, _, device = collective.setup("cpu", 7.0)
    try:
        out = {}
        with_timeout = dist.distributed_c10d._get_default_group()
        try:  # private API (torch 2.14): the timeout the process group was given
            out["timeout_s"] = with_timeout._get_backend(device).options._timeout.total_seconds()
        except AttributeError:
            out["timeout_s"] = None
        ragged = torch.arange(3 + 4 * rank, dtype=torch.float16).reshape(-1, 1) + 100 * rank
        out["gathered"] = collective.all_gather_rows(ragged)

        train_x, train_y, test_x, test_y = _problem()
        lo, hi = shard_range(len(train_x), rank, 2, BLOCK)
        qlo, qhi = shard_range(len(test_x), rank, 2)
        shards = (train_x[lo:hi], train_y[lo:hi], test_x[qlo:qhi], test_y[qlo:qhi])
        out["votes"], out["labels"] = knn_votes(*shards, k=9, temperature=0.1, block=BLOCK)
        out["knn"] = knn_accuracy(*shards, k=9, temperature=0.1, block=BLOCK)

        x_train, y_train, x_test, y_test = _digits(seed=4)
        lo, hi = shard_range(len(x_train), rank, 2, 256)  # 768 and 579 rows: uneven on purpose
        qlo, qhi = shard_range(len(x_test), rank, 2)
        out["probe"] = linear_probe_scores(x_train[lo:hi], y_train[lo:hi], x_test[qlo:qhi], y_test[qlo:qhi],
                                           epochs=30)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        collective.teardown()


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    for out in ranks:
        if out["timeout_s"] is not None:
            assert out["timeout_s"] == 7 * 60
        expected = torch.cat([torch.arange(3.0), torch.arange(7.0) + 100]).half().reshape(-1, 1)
        assert torch.equal(out["gathered"], expected)

    train_x, train_y, test_x, test_y = _problem()
    votes, labels = knn_votes(train_x, train_y, test_x, test_y, k=9, temperature=0.1, block=BLOCK)
    accuracy = knn_accuracy(train_x, train_y, test_x, test_y, k=9, temperature=0.1, block=BLOCK)
    assert 0.3 < accuracy < 0.95  # the votes matter
    for out in ranks:  # same neighbours and weights: the votes themselves are bitwise those of one process
        assert torch.equal(out["labels"], labels) and torch.equal(out["votes"], votes)
        assert out["knn"] == accuracy

    x_train, y_train, x_test, y_test = _digits(seed=4)
    one = linear_probe_scores(x_train, y_train, x_test, y_test, epochs=30)
    assert one["top1"] > 0.9
    assert ranks[0]["probe"] == ranks[1]["probe"]  # every rank trained the same head
    assert abs(ranks[0]["probe"]["top1"] - one["top1"]) <= 0.02


def test_the_linear_protocol_is_chosen_by_the_training_set_size():
    """LARS at batch 4096 is published for ImageNet; on a small set it takes a step or two per epoch and stays at
    chance, so without --optimizer a set below LARS_MIN_IMAGES gets SGD at batch 256 (a smaller power of two when
    that leaves fewer than FEW_STEPS steps), said in one line; a choice that leaves too few steps is warned about."""
    from fastpred.eval.linear import FEW_STEPS, LARS_MIN_IMAGES, protocol_settings

    imagenet, note = protocol_settings(1_281_167)
    assert (imagenet.optimizer, imagenet.batch_size, imagenet.lr, note) == ("lars", 4096, 0.32, None)
    cifar, note = protocol_settings(50_000)
    assert (cifar.optimizer, cifar.batch_size, cifar.lr) == ("sgd", 256, 30.0) and note.startswith("linear: SGD")
    digits, note = protocol_settings(1437)
    assert (digits.optimizer, digits.batch_size, digits.lr) == ("sgd", 128, 15.0)
    assert -(-1437 // 128) >= FEW_STEPS and f"from {LARS_MIN_IMAGES} images on" in note
    chosen, note = protocol_settings(1437, optimizer="lars", epochs=2)
    assert (chosen.optimizer, chosen.batch_size, chosen.epochs) == ("lars", 4096, 2)
    assert note == ("warning: the linear protocol takes 1 step(s) per epoch at batch 4096 on 1437 training images; "
                    "pass a smaller --batch-size")
    given, note = protocol_settings(1437, batch_size=64, base_lr=1.0)
    assert (given.optimizer, given.batch_size, given.lr) == ("sgd", 64, 0.25)
