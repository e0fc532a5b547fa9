"""fastpred.kernels.eigh_warm through invariants (U diag(s) U^T = F, U^T U = I, eigenvalues against a float64
eigvalsh), never by comparing eigenvectors. n <= 64 runs in one program per matrix, n = 100 the block path."""

import pytest
import torch
from devices import TRITON_DEVICES, needs_cuda, needs_interpreter
from fastpred.kernels import eigh_ref, eigh_warm, jacobi_ref
from fastpred.kernels.eigh import _jacobi_small


def _wishart(B: int, n: int, N: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, n, generator=g, dtype=torch.float64)
    return (z.transpose(-1, -2) @ z / N).float().to(device)  # (B, n, n), PSD, rank min(n, N)


def _with_spectrum(s: torch.Tensor, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(s.shape[-1], s.shape[-1], generator=g, dtype=torch.float64))
    return ((Q * s.double()) @ Q.T).float().to(device)


def _errors(F: torch.Tensor, s: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relative reconstruction error, orthogonality error, max eigenvalue error / ||F||_2, per matrix (float64)."""
    F64, s64, U64 = F.double().cpu(), s.double().cpu(), U.double().cpu()
    norm = F64.norm(dim=(-2, -1)).clamp_min(1e-300)
    rec = ((U64 * s64.unsqueeze(-2)) @ U64.transpose(-1, -2) - F64).norm(dim=(-2, -1)) / norm
    eye = torch.eye(F.shape[-1], dtype=torch.float64)
    orth = (U64.transpose(-1, -2) @ U64 - eye).norm(dim=(-2, -1))
    ev = torch.linalg.eigvalsh(F64)
    scale = ev.abs().amax(-1).clamp_min(1e-300)
    ev_err = (torch.sort(s64, dim=-1).values - ev).abs().amax(-1) / scale
    return rec, orth, ev_err


def _assert_accurate(F: torch.Tensor, s: torch.Tensor, U: torch.Tensor, slack: float = 1.0) -> None:
    """Kernel errors <= 2 x those of torch.linalg.eigh in plain fp32 on the same F, + a small atol."""
    s32, U32 = torch.linalg.eigh(F.cpu())
    rec, orth, ev = _errors(F, s, U)
    rec32, orth32, ev32 = _errors(F.cpu(), s32, U32)
    n = F.shape[-1]
    atol = slack * 1e-6 * max(1.0, n / 32) ** 0.5
    assert (rec <= 2 * rec32 + atol).all(), (rec, rec32)
    assert (orth <= 2 * orth32 + 2 * atol).all(), (orth, orth32)
    assert (ev <= 2 * ev32 + atol).all(), (ev, ev32)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("n", "B"), [(1, 3), (7, 3), (32, 3), (64, 1), (100, 1)])
def test_cold_start(device, n, B):
    F = _wishart(B, n, 2 * n + 3, device, seed=n)
    s, U, converged = eigh_warm(F)
    assert s.shape == (B, n) and U.shape == (B, n, n) and converged.shape == (B,)
    assert converged.dtype == torch.bool and converged.all()
    _assert_accurate(F, s, U)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("n", "B"), [(7, 3), (64, 1), (100, 1)])
def test_warm_start_from_a_perturbed_basis_needs_few_sweeps(device, n, B):
    F = _wishart(B, n, 3 * n, device, seed=10 + n)
    _, U0 = eigh_ref(F)  # the previous step's basis
    F_next = 0.99 * F + 0.01 * _wishart(B, n, 3 * n, device, seed=20 + n)  # one EMA step at rho = 0.99
    s, U, converged = eigh_warm(F_next, U0.to(device), sweeps_cap=torch.tensor(2, device=device))
    assert converged.all()  # within 2 sweeps
    _assert_accurate(F_next, s, U)
    # The order is that of the warm basis: s[i] is close to the previous step's eigenvalue i.
    s_prev = eigh_ref(F)[0].to(device)
    assert ((s - s_prev).abs() <= 0.05 * s_prev.abs().amax(-1, keepdim=True)).all()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_rank_deficient(device):
    F = _wishart(2, 32, 8, device, seed=3)  # d > N: 24 zero eigenvalues
    s, U, converged = eigh_warm(F)
    assert converged.all()
    _assert_accurate(F, s, U)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_repeated_eigenvalues(device):
    spectrum = torch.tensor([3.0] * 10 + [1.0] * 12 + [0.5] * 9 + [2.0])
    F = _with_spectrum(spectrum, device, seed=4)
    s, U, converged = eigh_warm(F)
    assert converged
    _assert_accurate(F, s, U)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_condition_number_1e7(device):
    F = _with_spectrum(torch.logspace(0, -7, 24, dtype=torch.float64), device, seed=5)
    s, U, converged = eigh_warm(F)
    assert converged
    _assert_accurate(F, s, U)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n", [7, 100])
def test_zero_matrix(device, n):
    F = torch.zeros(n, n, device=device)
    s, U, converged = eigh_warm(F)
    assert converged and torch.equal(s, torch.zeros(n, device=device))
    assert torch.equal(U, torch.eye(n, device=device))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n", [7, 100])
def test_sweep_cap_zero_reports_not_converged(device, n):
    F = _wishart(1, n, 2 * n, device, seed=6)[0]
    for cap in (0, torch.tensor(0, device=device), torch.tensor(0, dtype=torch.int64, device=device)):
        s, U, converged = eigh_warm(F, sweeps_cap=cap, max_sweeps=2)
        assert s.shape == (n,) and U.shape == (n, n) and converged.shape == ()
        assert not converged
        # No sweep: s is the diagonal of F itself, U the identity (up to the final polar step).
        torch.testing.assert_close(s, torch.diagonal(F))
        torch.testing.assert_close(U, torch.eye(n, device=device))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n", [7, 100])
def test_per_matrix_cap_and_exact_resolve(device, n):
    # The same matrix twice: one sweep is too few from cold, a cap raised on the device (the exact
    # re-solve after a non-convergence) converges, in one call and without a host round trip.
    F = _wishart(1, n, 2 * n, device, seed=7).expand(2, n, n).contiguous()
    cap = torch.tensor([1, 8], dtype=torch.int32, device=device)
    s, U, converged = eigh_warm(F, sweeps_cap=cap, max_sweeps=8)
    assert converged.tolist() == [False, True]
    _assert_accurate(F[1:], s[1:], U[1:])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_block_path_leaves_finished_matrices_alone(device):
    # n = 70: 3 blocks of 32 (the last one padded), padded to 4. Per-matrix caps 0, 8 and 3 in one batch: the flags
    # read by the kernels must stop each matrix at its own cap, a capped-at-0 one bitwise untouched (diag(F), I).
    n = 70
    F = _wishart(3, n, 2 * n, device, seed=11)
    cap = torch.tensor([0, 8, 3], dtype=torch.int32, device=device)
    s, U, converged = eigh_warm(F, sweeps_cap=cap, max_sweeps=8)
    assert converged.tolist() == [False, True, False]
    assert torch.equal(s[0], torch.diagonal(F[0])) and torch.equal(U[0], torch.eye(n, device=device))
    _assert_accurate(F[1:2], s[1:2], U[1:2])
    s2, U2, _ = eigh_warm(F[2], max_sweeps=3)
    torch.testing.assert_close(s[2], s2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(U[2], U2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_non_finite_input_stops_and_reports(device):
    F = _wishart(2, 16, 40, device, seed=8)
    F[1, 3, 5] = F[1, 5, 3] = float("nan")
    s, U, converged = eigh_warm(F)  # must terminate
    assert converged.tolist() == [True, False]
    _assert_accurate(F[:1], s[:1], U[:1])


@needs_interpreter
def test_tf32_setting_is_restored():
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        eigh_warm(torch.eye(70), max_sweeps=1)  # block path toggles TF32 off around its matmuls
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("n", "warm"), [(7, True), (32, True), (12, False)])
def test_jacobi_ref_mirrors_the_register_kernel(device, n, warm):
    # The plain-torch Jacobi (the CPU baseline of bench/) runs the kernel's rounds and stopping rule: the same sweep
    # count per matrix, and an eigendecomposition as accurate.
    F = _wishart(2, n, 3 * n, "cpu", seed=30 + n)
    U0 = eigh_ref(0.7 * F + 0.3 * _wishart(2, n, 3 * n, "cpu", seed=40 + n))[1] if warm else None
    _, _, conv, sweeps = _jacobi_small(F.to(device), None if U0 is None else U0.to(device), None, 12, 2e-6)
    s, U, conv_ref, sweeps_ref = jacobi_ref(F, U0)
    assert torch.equal(sweeps.cpu(), sweeps_ref) and torch.equal(conv.cpu(), conv_ref) and conv_ref.all()
    _assert_accurate(F, s, U)


def test_reference():
    F = _wishart(2, 9, 30, "cpu", seed=9)
    s, U = eigh_ref(F)
    assert s.dtype == U.dtype == torch.float32
    _assert_accurate(F, s, U)


def test_bad_arguments_raise_one_line():
    F = torch.eye(5)
    cases = [
        (torch.zeros(5, 4), {}),
        (torch.zeros(2, 2, 5, 5), {}),
        (F.double(), {}),
        (torch.zeros(0, 0), {}),
        (F, {"U0": torch.eye(4)}),
        (F, {"U0": torch.eye(5).double()}),
        (F, {"max_sweeps": -1}),
        (F, {"max_sweeps": 2.5}),
        (F, {"tol": -1.0}),
        (F, {"sweeps_cap": torch.tensor(1.0)}),
        (F, {"sweeps_cap": torch.tensor([1, 2])}),
        (F, {"sweeps_cap": "3"}),
    ]
    for F_, kw in cases:
        with pytest.raises(ValueError, match="eigh_warm") as info:
            eigh_warm(F_, **kw)
        assert "\n" not in str(info.value)


@needs_cuda
def test_cuda_first_block_solve_inside_graph_capture_then_eager():
    # The block solver keeps no device state between calls (its pairs are computed in the kernels): a first solve
    # at a size captured into a CUDA graph leaves nothing in the graph's pool that an eager call before the first
    # replay could read unwritten.
    warm = _wishart(1, 160, 320, "cuda", seed=20)  # compiles the block kernels at another size (6 blocks)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eigh_warm(warm)
    torch.cuda.current_stream().wait_stream(side)
    F = _wishart(2, 96, 200, "cuda", seed=21)  # 3 blocks padded to 4: first seen during capture
    static_F = F.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_g, U_g, conv_g = eigh_warm(static_F)
    s, U, conv = eigh_warm(F)  # eager, before any replay
    assert conv.all()
    _assert_accurate(F, s, U)
    graph.replay()
    torch.cuda.synchronize()
    assert conv_g.all()
    _assert_accurate(F, s_g, U_g)
