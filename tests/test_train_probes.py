"""fastpred.train.probes: online probe, feature extraction, kNN monitor and offline linear probe."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpred.train.probes import OnlineProbe, extract_features, knn_accuracy, linear_probe_accuracy


@pytest.fixture(autouse=True)
def one_thread():
    # These are many tiny ops: on shared cores OpenMP's hand-offs cost more than the arithmetic
    # (the digits probe takes ~1 s on one thread and ~9 s on two busy ones).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# --- kNN ------------------------------------------------------------------------------------------


def _knn_reference(train_x, train_y, test_x, k, temperature, num_classes):
    """Per query, written out plainly: the oracle for the chunked implementation."""
    bank = F.normalize(train_x, dim=1)
    preds = []
    for q in F.normalize(test_x, dim=1):
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


def test_knn_matches_plain_reference_for_any_chunk():
    train_x, train_y = _blobs(300, spread=6.0, seed=1)  # overlapping classes: the votes matter
    test_x, test_y = _blobs(57, spread=6.0, seed=2)
    expected = _knn_reference(train_x, train_y, test_x, k=7, temperature=0.1, num_classes=4)
    expected_acc = sum(int(p == t) for p, t in zip(expected, test_y.tolist(), strict=True)) / len(test_y)
    assert 0.3 < expected_acc < 1.0  # neither trivial nor perfect, so a wrong vote would show
    for chunk in (1, 10, 1024):
        acc = knn_accuracy(train_x, train_y, test_x, test_y, k=7, temperature=0.1, chunk=chunk)
        assert acc == expected_acc


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


# --- linear probe ---------------------------------------------------------------------------------


def test_linear_probe_on_digit_pixels_and_on_shuffled_labels():
    x_train, y_train, x_test, y_test = _digits()
    accuracy = linear_probe_accuracy(x_train, y_train, x_test, y_test)
    assert accuracy >= 0.95
    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(1))]
    chance = linear_probe_accuracy(x_train, shuffled, x_test, y_test, epochs=20)
    assert chance < 0.2


def test_linear_probe_is_deterministic_and_ignores_unlabelled_rows():
    x_train, y_train, x_test, y_test = _digits(seed=3)
    kw = {"epochs": 20, "seed": 5}
    first = linear_probe_accuracy(x_train, y_train, x_test, y_test, **kw)
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


# --- online probe ---------------------------------------------------------------------------------


def test_online_probe_learns_separable_problem_without_touching_features():
    torch.manual_seed(0)
    probe = OnlineProbe(16, 4, lr=1e-2)
    correct = counted = 0
    for step in range(60):
        x, y = _blobs(64, seed=step)
        x.requires_grad_(True)
        loss, c, n = probe.step(x, y)
        assert loss.dim() == c.dim() == n.dim() == 0 and c.dtype == n.dtype == torch.int64
        assert not loss.requires_grad and x.grad is None
        if step >= 40:
            correct, counted = correct + int(c), counted + int(n)
    assert counted == 20 * 64 and correct / counted > 0.95
    first_loss = OnlineProbe(16, 4).step(*_blobs(64, seed=99))[0]
    assert loss < 0.1 * first_loss


def test_online_probe_masks_unlabelled_samples():
    torch.manual_seed(0)
    probe = OnlineProbe(16, 4)
    initial = copy.deepcopy(probe)
    x, y = _blobs(32)
    y[::4] = -1
    loss, correct, counted = probe.step(x, y)
    # The loss and the count are over the labelled rows, with the weights before the update.
    with torch.no_grad():
        logits = initial(x)  # training mode, as in step: BatchNorm on this batch's statistics
    labelled = y >= 0
    torch.testing.assert_close(loss, F.cross_entropy(logits[labelled], y[labelled]))
    assert int(counted) == 24
    assert int(correct) == int((logits.argmax(dim=1)[labelled] == y[labelled]).sum())
    none_loss, none_correct, none_counted = OnlineProbe(16, 4).step(x, torch.full((32,), -1))
    assert float(none_loss) == 0.0 and int(none_correct) == 0 and int(none_counted) == 0


def test_online_probe_resumes_bitwise():
    torch.manual_seed(0)
    batches = [_blobs(32, seed=s) for s in range(8)]
    probe = OnlineProbe(16, 4, lr=1e-2)
    for x, y in batches[:5]:
        probe.step(x, y)
    buffer = io.BytesIO()
    torch.save(probe.probe_state(), buffer)
    uninterrupted = [probe.step(x, y) for x, y in batches[5:]]

    buffer.seek(0)
    state = torch.load(buffer)
    resumed = OnlineProbe(16, 4, lr=1e-2)
    resumed.load_probe_state(state)
    replayed = [resumed.step(x, y) for x, y in batches[5:]]
    for a, b in zip(uninterrupted, replayed, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    for a, b in zip(probe.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # Without the optimizer's state (Adam's moments), the continuation differs: the state is what matters.
    full, partial = OnlineProbe(16, 4, lr=1e-2), OnlineProbe(16, 4, lr=1e-2)
    full.load_probe_state(state)
    partial.load_state_dict(state["module"])
    full.step(*batches[5]), partial.step(*batches[5])
    assert not torch.equal(partial.head.weight, full.head.weight)


# --- feature extraction ---------------------------------------------------------------------------


def test_extract_features_eval_mode_restores_modes_and_collects_on_cpu():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())
    backbone.train()
    backbone[2].eval()  # a mixed state must come back as it was
    # Eval mode: BatchNorm uses running statistics and the outputs are per-sample, so a batch split
    # differently gives the same features; training mode would not.
    images = torch.randint(0, 256, (10, 3, 6, 6), dtype=torch.uint8)
    labels = torch.arange(10)

    def preprocess(x):
        return x.float() / 255 - 0.5

    batches = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    feats, out_labels = extract_features(backbone, batches, preprocess, "cpu")
    assert feats.shape == (10, 64) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert torch.equal(out_labels, labels) and out_labels.dtype == torch.int64
    whole, _ = extract_features(backbone, [(images, labels)], preprocess, "cpu")
    torch.testing.assert_close(feats, whole)
    assert [m.training for m in backbone] == [True, True, False, True]
    assert not feats.requires_grad
    with pytest.raises(ValueError, match="no batches"):
        extract_features(backbone, [], preprocess, "cpu")
