"""fastpred.train.probes: the online probe (the frozen-feature evaluations are tested in test_eval_functions.py)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from fastpred.train.probes import OnlineProbe

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many tiny ops: see conftest.py


def _blobs(n: int, dim: int = 16, classes: int = 4, seed: int = 0, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.randint(classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


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
