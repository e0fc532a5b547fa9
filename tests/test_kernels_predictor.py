"""W from the statistics: predictor_from_eigh (fused kernel), predictor_newton_schulz and largest_eigenvalue,
against float64 evaluations of the contract, plus the keep-the-previous-W guards."""

import pytest
import torch
from devices import DEVICES, TRITON_DEVICES
from fastpred.kernels import (
    largest_eigenvalue,
    largest_eigenvalue_ref,
    predictor_from_eigh,
    predictor_from_eigh_ref,
    predictor_newton_schulz,
    predictor_newton_schulz_ref,
)


def _wishart(B: int, n: int, N: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, n, generator=g, dtype=torch.float64)
    return (z.transpose(-1, -2) @ z / N).float().to(device)


def _eig32(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s, U = torch.linalg.eigh(F.double())
    return s.float(), U.float()


def _contract_W(s: torch.Tensor, U: torch.Tensor, alpha: float, eps: float, floor: float = 1e-4) -> torch.Tensor:
    s64, U64 = s.double(), U.double()
    q = s64.clamp(min=0) / s64.amax(-1, keepdim=True)
    p = torch.clamp(q**alpha + eps, min=floor)
    return (U64 * p.unsqueeze(-2)) @ U64.transpose(-1, -2)


def _rel(W: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (W.double().cpu() - ref.double().cpu()).norm(dim=(-2, -1)) / ref.double().cpu().norm(dim=(-2, -1))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.3])
@pytest.mark.parametrize(("n", "B"), [(1, 3), (7, 3), (64, 1), (100, 3)])
def test_matches_the_contract(device, alpha, n, B):
    s, U = _eig32(_wishart(B, n, 2 * n, device, seed=n))
    if n > 1:
        s[..., 0] = -1e-3 * s[..., -1]  # a negative eigenvalue: clamped to q = 0
    for eps in (0.0, 0.1):
        W, ok = predictor_from_eigh(s, U, alpha, eps)
        assert ok.shape == (B,) and ok.all()
        ref = _contract_W(s, U, alpha, eps)
        # Same fp32 inputs: the only error is the fp32 product (and exp2/log2 for general alpha).
        torch.testing.assert_close(W.double(), ref.to(device), rtol=2e-6, atol=2e-6)
        assert torch.equal(W, W.transpose(-1, -2))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_floor_binds(device):
    s, U = _eig32(_wishart(1, 16, 4, device, seed=1))  # 12 zero eigenvalues
    W, ok = predictor_from_eigh(s[0], U[0], 2.0, 0.0, floor=0.05)
    assert ok
    torch.testing.assert_close(W.double(), _contract_W(s[0], U[0], 2.0, 0.0, floor=0.05), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_bad_matrices_keep_the_previous_W(device):
    s, U = _eig32(_wishart(4, 70, 100, device, seed=2))  # two row chunks of U per matrix
    s[1] = -s[1]  # max(s) <= 0
    s[2, 5] = float("nan")
    U[3, 66, 1] = float("inf")  # in the second row chunk
    prev = torch.randn(4, 70, 70, device=device)
    W, ok = predictor_from_eigh(s, U, 0.5, 0.1, out=prev.clone())
    assert ok.tolist() == [True, False, False, False]
    assert torch.equal(W[1:], prev[1:])
    torch.testing.assert_close(W[0].double(), _contract_W(s[0], U[0], 0.5, 0.1), rtol=2e-6, atol=2e-6)
    W_ref, ok_ref = predictor_from_eigh_ref(s, U, 0.5, 0.1, out=prev.clone())
    assert ok_ref.tolist() == ok.tolist()
    torch.testing.assert_close(W_ref, W, rtol=2e-6, atol=2e-6)
    # Without `out`, a rejected matrix is the identity (W before any statistics).
    W2, _ = predictor_from_eigh(s, U, 0.5, 0.1)
    assert torch.equal(W2[2], torch.eye(70, device=device))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_unbatched_and_out_is_written_in_place(device):
    s, U = _eig32(_wishart(1, 9, 20, device, seed=3))
    out = torch.zeros(9, 9, device=device)
    W, ok = predictor_from_eigh(s[0], U[0], 1.0, 0.05, out=out)
    assert W is out and ok.shape == () and ok
    torch.testing.assert_close(out.double(), _contract_W(s[0], U[0], 1.0, 0.05), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [7, 64, 100])
def test_largest_eigenvalue(device, n):
    F = _wishart(3, n, 2 * n, device, seed=4)
    smax, v = largest_eigenvalue(F)
    torch.testing.assert_close(smax.cpu(), largest_eigenvalue_ref(F).cpu(), rtol=1e-5, atol=0)
    # Warm start from the previous top vector: a few plain iterations suffice.
    F_next = 0.99 * F + 0.01 * _wishart(3, n, 2 * n, device, seed=5)
    smax2, _ = largest_eigenvalue(F_next, v, iters=2, squarings=2)
    torch.testing.assert_close(smax2.cpu(), largest_eigenvalue_ref(F_next).cpu(), rtol=1e-5, atol=0)
    # DirectCopy, alpha = 1: W = F / max(s) + eps I is the contract's W.
    eye = torch.eye(n, device=device)
    s, U = _eig32(F)
    assert (_rel(F / smax[:, None, None] + 0.1 * eye, _contract_W(s, U, 1.0, 0.1)) <= 1e-5).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "N"), [(7, 20), (64, 200), (100, 300), (64, 20), (100, 30)])
def test_newton_schulz_accuracy(device, n, N):
    F = _wishart(2, n, N, device, seed=n + N)
    W, ok = predictor_newton_schulz(F, 0.05)
    assert ok.all()
    ref = predictor_newton_schulz_ref(F, 0.05)
    s32, U32 = torch.linalg.eigh(F)  # the plain fp32 evaluation (fp32 F, fp32 eigh)
    err, err32 = _rel(W, ref), _rel(_contract_W(s32, U32, 0.5, 0.05), ref)
    # DESIGN.md: <= 1e-4, or 2 x the plain fp32 error where the spectrum makes that impossible.
    assert (err <= torch.maximum(torch.tensor(1e-4), 2 * err32)).all(), (err, err32)
    if N >= 2 * n:  # well conditioned: far better than the bar
        assert (err <= 2e-6).all(), err


@pytest.mark.parametrize("device", DEVICES)
def test_newton_schulz_flags_divergence_and_keeps_out(device):
    F = _wishart(2, 32, 8, device, seed=6)  # rank 8: fp32 noise eigenvalues ~ -1e-7 ||F||
    prev = torch.randn(2, 32, 32, device=device)
    # Too many iterations amplify the negative noise eigenvalues until the iteration blows up.
    W, ok = predictor_newton_schulz(F, 0.05, iters=40, out=prev.clone())
    assert not ok.any() and torch.equal(W, prev)
    smax = largest_eigenvalue_ref(F)
    W, ok = predictor_newton_schulz(F, 0.05, smax=smax, out=prev.clone())
    assert ok.all()
    assert (_rel(W, predictor_newton_schulz_ref(F, 0.05)) <= 1e-3).all()
    W, ok = predictor_newton_schulz(torch.zeros(5, 5, device=device), 0.05)
    assert not ok and torch.equal(W, torch.eye(5, device=device))


def test_bad_arguments_raise_one_line():
    s, U = torch.ones(4), torch.eye(4)
    cases = [
        (predictor_from_eigh, (torch.ones(3), U, 0.5, 0.1), {}),
        (predictor_from_eigh, (s, torch.eye(4)[:, :3], 0.5, 0.1), {}),
        (predictor_from_eigh, (s.double(), U.double(), 0.5, 0.1), {}),
        (predictor_from_eigh, (s, U, 0.0, 0.1), {}),
        (predictor_from_eigh, (s, U, 0.5, -0.1), {}),
        (predictor_from_eigh, (s, U, 0.5, 0.1), {"out": torch.zeros(3, 3)}),
        (predictor_newton_schulz, (torch.eye(4), 0.0), {}),
        (predictor_newton_schulz, (torch.eye(4).double(), 0.1), {}),
        (predictor_newton_schulz, (torch.zeros(4, 3), 0.1), {}),
        (largest_eigenvalue, (torch.eye(4), torch.ones(3)), {}),
    ]
    for fn, args, kw in cases:
        with pytest.raises(ValueError, match=fn.__name__) as info:
            fn(*args, **kw)
        assert "\n" not in str(info.value)
