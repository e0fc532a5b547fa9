"""fastpred.kernels.orth_iter (orthogonal iteration, Householder QR) against its float64 reference.

Q is compared directly: with diag(R) >= 0 the QR of a full-rank Y is unique, so the iteration is a well-defined map
(unlike an eigendecomposition, whose vectors are not). The bound is flash-attention's rule: the kernel's error
against float64 at most twice that of the same iteration in plain float32 torch, plus a small atol. Interpreted
Triton costs about 1 s per iteration at n = 64, so the sizes and iteration counts are small.
"""

import pytest
import torch
from devices import TRITON_DEVICES
from fastpred.kernels import eigh_warm, orth_iter, orth_iter_ref


def _spectrum_matrix(s: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(F float32 with eigenvalues s in a random basis, that basis Q float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(s.shape[-1], s.shape[-1], generator=g, dtype=torch.float64))
    return ((Q * s.double()) @ Q.T).float(), Q


def _nearby_basis(Q: torch.Tensor, angle: float, seed: int) -> torch.Tensor:
    """Q rotated by about `angle` radians: the previous step's eigenbasis of a drifting F (float32)."""
    g = torch.Generator().manual_seed(seed)
    n = Q.shape[-1]
    skew = torch.randn(n, n, generator=g, dtype=torch.float64)
    skew = (skew - skew.T) * (angle / (2.0 * (2.0 * n) ** 0.5))
    return (Q @ torch.linalg.matrix_exp(skew)).float()


def _drifting(n: int, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B matrices with 4 decades of decaying spectrum, each with a warm basis 0.05 rad away (the bench stream's
    drift per step)."""
    Fs, U0s = [], []
    for b in range(B):
        F, Q = _spectrum_matrix(torch.logspace(0, -4, n, dtype=torch.float64), seed + b)
        Fs.append(F)
        U0s.append(_nearby_basis(Q, 0.05, seed + 100 + b))
    return torch.stack(Fs), torch.stack(U0s)


def _err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Max abs error per matrix (float64)."""
    return (x.double().cpu() - ref.double().cpu()).abs().flatten(1).amax(1)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("n", "B", "iters"), [(1, 2, 2), (7, 3, 3), (32, 2, 2), (64, 1, 1)])
def test_matches_float64_reference(device, n, B, iters):
    F, U0 = _drifting(n, B, seed=n)
    s, Q, converged = orth_iter(F.to(device), U0.to(device), max_iters=iters)
    assert s.shape == (B, n) and Q.shape == (B, n, n) and converged.dtype == torch.bool
    s64, Q64, conv64 = orth_iter_ref(F, U0, max_iters=iters)
    s32, Q32, _ = orth_iter_ref(F, U0, max_iters=iters, dtype=torch.float32)
    scale = F.double().norm(dim=(-2, -1))
    assert (_err(Q, Q64) <= 2 * _err(Q32, Q64) + 2e-6).all(), (_err(Q, Q64), _err(Q32, Q64))
    assert (_err(s, s64) / scale <= 2 * _err(s32, s64) / scale + 1e-6).all()
    assert torch.equal(converged.cpu(), conv64)
    eye = torch.eye(n, dtype=torch.float64)
    assert ((Q.double().cpu().mT @ Q.double().cpu() - eye).abs().amax((-2, -1)) <= 1e-6).all()
    if n > 1:  # a drifted basis 1 to 3 iterations on is not yet an eigenbasis to 2e-6
        assert not converged.any()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_converges_on_a_separated_spectrum(device):
    # Neighbouring eigenvalues a factor 4 apart: the error falls 4x per iteration, the test stops the loop.
    F, Q_true = _spectrum_matrix(4.0 ** -torch.arange(8, dtype=torch.float64), seed=3)
    U0 = _nearby_basis(Q_true, 0.3, seed=4)
    s, Q, converged = orth_iter(F.to(device), U0.to(device), max_iters=40)
    assert converged
    ev = torch.linalg.eigvalsh(F.double()).flip(0)  # descending: the order the iteration sorts into
    assert ((s.double().cpu() - ev).abs() <= 1e-6 * ev[0]).all()
    rec = (Q.double().cpu() * s.double().cpu()) @ Q.double().cpu().T - F.double()
    assert rec.norm() <= 1e-5 * F.double().norm()
    # It stopped once converged: the same result as with a cap at the reference's count.
    s64, Q64, conv64 = orth_iter_ref(F, U0, max_iters=40)
    assert conv64 and _err(Q[None], Q64[None]) <= 1e-5


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_zero_iterations_sort_the_warm_basis(device):
    # torch.linalg.eigh returns ascending eigenvalues; the iteration's order is descending, so the columns are
    # reversed, and the exact eigenbasis is already converged.
    F, _ = _spectrum_matrix(torch.linspace(1.0, 2.0, 6, dtype=torch.float64), seed=5)
    ev, U = torch.linalg.eigh(F)
    s, Q, converged = orth_iter(F.to(device), U.to(device), max_iters=0)
    assert converged
    torch.testing.assert_close(s.cpu(), ev.flip(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(Q.cpu(), U.flip(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_per_matrix_iteration_cap_on_the_device(device):
    F, U0 = _drifting(16, 1, seed=6)
    F2, U02 = F.expand(2, 16, 16).contiguous(), U0.expand(2, 16, 16).contiguous()
    cap = torch.tensor([0, 3], dtype=torch.int32, device=device)
    s, Q, _ = orth_iter(F2.to(device), U02.to(device), max_iters=5, iters_cap=cap)
    for b, iters in enumerate((0, 3)):
        s1, Q1, _ = orth_iter(F.to(device), U0.to(device), max_iters=iters)
        assert torch.equal(Q[b : b + 1], Q1) and torch.equal(s[b : b + 1], s1)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_rank_deficient_zero_and_non_finite(device):
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(12, 4, generator=g))
    z = torch.tensor([[8.0], [4.0], [2.0], [1.0]]) * Q.T  # rank 4, singular values 4x apart: fast from cold
    F = torch.stack([z.T @ z, torch.zeros(12, 12), z.T @ z])  # rank 4, zero, and a NaN below
    F[2, 3, 5] = F[2, 5, 3] = float("nan")
    U0 = torch.eye(12).expand(3, 12, 12).contiguous()
    s, Q, converged = orth_iter(F.to(device), U0.to(device), max_iters=30)  # must terminate
    s, Q = s.cpu(), Q.cpu()
    assert converged.tolist() == [True, True, False]
    eye = torch.eye(12)
    for b in (0, 1):  # orthonormal, null directions included; Rayleigh quotients = eigenvalues, zeros last
        assert (Q[b].T @ Q[b] - eye).abs().max() <= 1e-6
        ev = torch.linalg.eigvalsh(F[b].double()).flip(0)
        assert ((s[b].double() - ev).abs() <= 1e-5 * max(float(ev[0]), 1.0)).all()
    assert torch.equal(Q[1], eye) and torch.equal(s[1], torch.zeros(12))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_rayleigh_ritz_step_is_eigh_warm(device):
    # Without the step the drifted basis leaves off-diagonal mass; Jacobi on Q^T F Q finishes the eigenbasis.
    F, U0 = _drifting(24, 2, seed=8)
    F, U0 = F.to(device), U0.to(device)
    _, Q, converged = orth_iter(F, U0, max_iters=2)
    assert not converged.any()
    s, U, converged = eigh_warm(F, Q)
    assert converged.all()
    F64, s64, U64 = F.double().cpu(), s.double().cpu(), U.double().cpu()
    rec = ((U64 * s64.unsqueeze(-2)) @ U64.mT - F64).norm(dim=(-2, -1)) / F64.norm(dim=(-2, -1))
    assert (rec <= 1e-6).all()
    ev = torch.linalg.eigvalsh(F64)
    assert ((torch.sort(s64, dim=-1).values - ev).abs().amax(-1) <= 1e-6 * ev[:, -1]).all()


def test_bad_arguments_raise_one_line():
    F = torch.eye(5)
    cases = [
        (torch.zeros(5, 4), {}),
        (F.double(), {}),
        (torch.zeros(65, 65), {}),
        (F, {"U0": torch.eye(4)}),
        (F, {"max_iters": -1}),
        (F, {"tol": -1.0}),
        (F, {"iters_cap": torch.tensor(1.0)}),
        (F, {"iters_cap": torch.tensor([1, 2])}),
        (F, {"iters_cap": "3"}),
    ]
    for F_, kw in cases:
        with pytest.raises(ValueError, match="orth_iter") as info:
            orth_iter(F_, **kw)
        assert "\n" not in str(info.value)
