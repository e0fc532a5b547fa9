"""fastpred.kernels.corr_ema against a float64 evaluation: sizes, dtypes, strides, device flags, errors."""

import pytest
import torch
from devices import TRITON_DEVICES
from fastpred.kernels import corr_ema, corr_ema_ref

TOL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _sym(d: int, device: str) -> torch.Tensor:
    A = torch.randn(d, d, device=device)
    return (A + A.T) / 2


def _oracle(F: torch.Tensor, z: torch.Tensor, rho: float) -> torch.Tensor:
    z64 = z.double()  # same (possibly bf16-rounded) inputs, exact products and sums
    return rho * F.double() + (1 - rho) * z64.T @ z64 / z.shape[0]


def _plain_fp32(F: torch.Tensor, z: torch.Tensor, rho: float) -> torch.Tensor:
    z32 = z.float()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the plain fp32 evaluation, not TF32
    try:
        return rho * F + (1 - rho) * (z32.T @ z32) / z.shape[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", TOL_DTYPES)
@pytest.mark.parametrize("N", [1, 3, 257])
@pytest.mark.parametrize("d", [1, 7, 32, 64, 100])
def test_matches_float64(device, dtype, N, d):
    torch.manual_seed(d * 1000 + N)
    z = (torch.randn(N, d, device=device) + 0.5).to(dtype)  # nonzero mean: exercises `mean`
    F0 = _sym(d, device)
    F, mean = F0.clone(), torch.full((d,), float("nan"), device=device)
    out = corr_ema(F, z, 0.3, mean=mean)
    assert out is F
    ref = _oracle(F0, z, 0.3)
    err = (F.double() - ref).abs().max()
    err_plain = (_plain_fp32(F0, z, 0.3).double() - ref).abs().max()
    assert err <= 2 * err_plain + 1e-6 * ref.abs().max(), (err, err_plain)
    assert torch.equal(F, F.T)  # mirrored tiles: exactly symmetric
    torch.testing.assert_close(mean.double(), z.double().mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("N", "splits"), [(1, 3), (257, 2), (257, 5), (300, 40)])
def test_split_k_matches_float64(device, N, splits):
    # Slices of N reduced in parallel, then summed in a fixed order; flags and mean as without splits.
    torch.manual_seed(N + splits)
    z = torch.randn(2 * N, 70, device=device)[::2] + 0.5  # strided rows
    F0 = _sym(70, device)
    F, mean = F0.clone(), torch.full((70,), float("nan"), device=device)
    corr_ema(F, z, 0.3, mean=mean, splits=splits)
    ref = _oracle(F0, z, 0.3)
    err_plain = (_plain_fp32(F0, z, 0.3).double() - ref).abs().max()
    assert (F.double() - ref).abs().max() <= 2 * err_plain + 1e-6 * ref.abs().max()
    assert torch.equal(F, F.T)
    torch.testing.assert_close(mean.double(), z.double().mean(0), rtol=1e-5, atol=1e-6)
    again = F0.clone()
    corr_ema(again, z, 0.3, splits=splits)
    assert torch.equal(again, F)  # deterministic
    corr_ema(again, z, 0.3, splits=splits, valid=torch.tensor(False, device=device), mean=mean)
    assert torch.equal(again, F)
    corr_ema(again, z, 0.3, splits=splits, first=torch.tensor(True, device=device))
    torch.testing.assert_close(again.double(), z.double().T @ z.double() / N, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
def test_feature_blocks_in_one_launch(device, splits):
    # F (G, m, m): block g folds z[:, g m : (g + 1) m], as G separate calls would.
    torch.manual_seed(7 + splits)
    G, m, N = 3, 20, 100
    z = torch.randn(N, 2 * G * m, device=device)[:, ::2] + 0.25  # strided columns
    F0 = torch.stack([_sym(m, device) for _ in range(G)])
    F, mean = F0.clone(), torch.zeros(G * m, device=device)
    corr_ema(F, z, 0.9, mean=mean, splits=splits)
    for g in range(G):
        one = F0[g].clone()
        corr_ema(one, z[:, g * m : (g + 1) * m], 0.9, splits=splits)
        assert torch.equal(F[g], one)
        ref = _oracle(F0[g], z[:, g * m : (g + 1) * m], 0.9)
        torch.testing.assert_close(F[g].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), z.double().mean(0), rtol=1e-5, atol=1e-6)
    expected = corr_ema_ref(F0.clone(), z, 0.9)
    torch.testing.assert_close(F, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_strided_input(device):
    torch.manual_seed(0)
    big = torch.randn(300, 220, device=device)
    z = big[::2, 3::2]  # (150, 109), both strides != natural
    zt = torch.randn(100, 150, device=device).T  # (150, 100), column-major
    for zz in (z, zt):
        assert not zz.is_contiguous()
        F0 = _sym(zz.shape[1], device)
        F = F0.clone()
        corr_ema(F, zz, 0.9)
        ref = _oracle(F0, zz, 0.9)
        err_plain = (_plain_fp32(F0, zz.contiguous(), 0.9).double() - ref).abs().max()
        assert (F.double() - ref).abs().max() <= 2 * err_plain + 1e-6 * ref.abs().max()


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("flag_dtype", [torch.bool, torch.int64, torch.int32])
def test_first_starts_the_ema_without_reading_F(device, flag_dtype):
    torch.manual_seed(1)
    z = torch.randn(9, 20, device=device)
    F = torch.full((20, 20), float("nan"), device=device)  # garbage must not leak through 0 * NaN
    corr_ema(F, z, 0.5, first=torch.tensor(1, dtype=flag_dtype, device=device))
    torch.testing.assert_close(F.double(), z.double().T @ z.double() / 9, rtol=1e-5, atol=1e-6)
    F0 = F.clone()
    corr_ema(F, z, 0.5, first=torch.tensor(0, dtype=flag_dtype, device=device))  # an ordinary fold
    torch.testing.assert_close(F.double(), _oracle(F0, z, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_invalid_batch_writes_nothing(device):
    torch.manual_seed(2)
    z = torch.randn(5, 40, device=device)
    z[2, 7] = float("nan")
    F0, mean0 = _sym(40, device), torch.randn(40, device=device)
    F, mean = F0.clone(), mean0.clone()
    corr_ema(F, z, 0.3, valid=torch.tensor(False, device=device), mean=mean)
    assert torch.equal(F, F0) and torch.equal(mean, mean0)
    corr_ema(F, z, 0.3, valid=torch.tensor(0, device=device), first=torch.tensor(True, device=device))
    assert torch.equal(F, F0)
    z[2, 7] = 0.0
    corr_ema(F, z, 0.3, valid=torch.tensor(True, device=device), mean=mean)
    torch.testing.assert_close(F.double(), _oracle(F0, z, 0.3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, z.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_reference_has_the_same_semantics(device):
    torch.manual_seed(3)
    z = torch.randn(7, 12, device=device).to(torch.bfloat16)
    F0 = _sym(12, device)
    for first, valid in [(None, None), (1, None), (0, 1), (1, 0)]:
        kw = {}
        if first is not None:
            kw["first"] = torch.tensor(first, device=device)
        if valid is not None:
            kw["valid"] = torch.tensor(bool(valid), device=device)
        F, F_ref = F0.clone(), F0.clone()
        m, m_ref = torch.zeros(12, device=device), torch.zeros(12, device=device)
        corr_ema(F, z, 0.7, mean=m, **kw)
        corr_ema_ref(F_ref, z, 0.7, mean=m_ref, **kw)
        torch.testing.assert_close(F, F_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_one_line():
    z = torch.randn(4, 6)
    F = torch.zeros(6, 6)
    cases = [
        (torch.zeros(5, 5), z, 0.5, {}),  # F does not match d
        (F.double(), z, 0.5, {}),  # F not float32
        (torch.zeros(6, 12)[:, ::2], z, 0.5, {}),  # F not contiguous
        (F, z[:0], 0.5, {}),  # N = 0
        (F, z.double(), 0.5, {}),  # z dtype
        (F, z[None], 0.5, {}),  # z not 2-D
        (F, z, 1.0, {}),  # rho out of [0, 1)
        (F, z, -0.1, {}),
        (F, z, 0.5, {"first": torch.tensor([1])}),  # flag not 0-dim
        (F, z, 0.5, {"valid": torch.tensor(1.0)}),  # flag not integer
        (F, z, 0.5, {"first": True}),  # flag not a tensor
        (F, z, 0.5, {"mean": torch.zeros(5)}),
        (F, z, 0.5, {"splits": 0}),
        (torch.zeros(4, 2, 2), z, 0.5, {}),  # G * m != d
        (torch.zeros(2, 3, 4), z, 0.5, {}),  # blocks not square
        (F, z, 0.5, {"splits": 2.0}),
    ]
    for F_, z_, rho, kw in cases:
        with pytest.raises(ValueError, match="corr_ema") as info:
            corr_ema(F_, z_, rho, **kw)
        assert "\n" not in str(info.value)
