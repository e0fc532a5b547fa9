"""The trained baselines: shapes, parameters, and the off-diagonal head's exact unit diagonal."""

import pytest
import torch

from fastpred import LinearPredictor, MLPPredictor, OffDiagonalPredictor


@pytest.mark.parametrize("make", [LinearPredictor, lambda d: MLPPredictor(d, hidden=32), OffDiagonalPredictor])
def test_maps_n_by_d_to_n_by_d_and_rejects_other_shapes(make):
    head = make(12)
    assert head(torch.randn(5, 12)).shape == (5, 12)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 12\), got \(5, 11\)"):
        head(torch.randn(5, 11))


def test_linear_is_bias_free():
    head = LinearPredictor(6)
    assert [name for name, _ in head.named_parameters()] == ["linear.weight"]
    z = torch.randn(3, 6)
    torch.testing.assert_close(head(z), z @ head.linear.weight.T)


def test_mlp_is_linear_bn_relu_linear_with_hidden_size():
    head = MLPPredictor(8, hidden=20)
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head.net[0].weight.shape == (20, 8) and head.net[3].weight.shape == (8, 20)
    assert "8, hidden=20" in repr(head)


def test_off_diagonal_starts_as_identity():
    head = OffDiagonalPredictor(7)
    z = torch.randn(4, 7)
    assert torch.equal(head(z), z)
    assert torch.equal(head.matrix, torch.eye(7))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
        lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.5),
    ],
)
def test_off_diagonal_keeps_unit_diagonal_under_any_optimizer(make_optimizer):
    torch.manual_seed(0)
    head = OffDiagonalPredictor(6)
    with torch.no_grad():
        head.A.diagonal().fill_(3.0)  # even if something writes the raw diagonal, W's diagonal is 1
    opt = make_optimizer(head.parameters())
    target = torch.randn(6, 6)
    for _ in range(20):
        opt.zero_grad()
        z = torch.randn(16, 6)
        (head(z) - z @ target).square().mean().backward()
        assert torch.equal(head.A.grad.diagonal(), torch.zeros(6))
        opt.step()
    W = head.matrix
    assert torch.equal(W.diagonal(), torch.ones(6))
    assert (W - torch.diag(W.diagonal())).abs().sum() > 0.1  # the off-diagonal part did learn
    z = torch.randn(3, 6)
    torch.testing.assert_close(head(z), z @ W)
