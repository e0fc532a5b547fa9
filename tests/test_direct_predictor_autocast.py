"""DirectPredictor inside the caller's mixed-precision settings: `torch.autocast` and the fp32 matmul precision.

CPU autocast follows CUDA's matmul policy (mm, addmm, bmm, baddbmm run in the autocast dtype), so these tests
catch on the CPU what a first bf16 GPU run would meet. The statistics must stay the exact fp32 evaluation of the
contract whatever the region; the reference is the float64 evaluation of the same (half-precision) inputs.
"""

import subprocess
import sys

import pytest
import torch
from contract import allowed_error, decaying_features, evaluate_stream, rel_err
from devices import TRITON_DEVICES, needs_cuda

from fastpred import DirectPredictor

TORCH_FLOOR, TRITON_FLOOR = 1e-5, 1e-4  # DESIGN's accuracy bounds where float32 allows them
HALF = [torch.bfloat16, torch.float16]


def _stream(d: int, steps: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    return [z.to(dtype) for z in decaying_features(2 * d, d, steps=steps, seed=seed)]


def _run_autocast(pred: DirectPredictor, batches, autocast_dtype, device: str = "cpu"):
    """Feed the stream inside an autocast region; (out, F, W) of the whole predictor after every step."""
    got = []
    with torch.autocast(device, dtype=autocast_dtype):
        for z in batches:
            out = pred(z.to(device))
            got.append((out.detach().cpu(), pred.F.detach().cpu().clone(), pred.W.detach().cpu().clone()))
    return got


def _assert_contract(got, batches, *, alpha, floor, groups=1, rho=0.3, eps=0.1, steps_checked=None):
    """F and W of the last `steps_checked` steps (default: all, as `got` holds them) within DESIGN's rule against
    float64 of the inputs as given (widened exactly)."""
    d = batches[0].shape[1]
    m = d // groups
    for g in range(groups):
        widened = [z[:, g * m:(g + 1) * m].float() for z in batches]
        exact = evaluate_stream(widened, rho=rho, eps=eps, alpha=alpha, freq=1, dtype=torch.float64)
        plain = evaluate_stream(widened, rho=rho, eps=eps, alpha=alpha, freq=1, dtype=torch.float32)
        checked = len(got) if steps_checked is None else steps_checked
        for t, ((_, F, W), ref, fp32) in enumerate(zip(got[-checked:], exact[-checked:], plain[-checked:],
                                                         strict=True)):
            for name, value, want, baseline in (("F", F[g], ref.F, fp32.F), ("W", W[g], ref.W, fp32.W)):
                err, bound = rel_err(value, want), allowed_error(baseline, want, floor)
                assert err <= bound, f"step {t} block {g}: {name} error {err:.2e} > allowed {bound:.2e}"


@pytest.mark.parametrize("autocast_dtype", HALF)
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_torch_backend_under_autocast_keeps_the_contract(d, autocast_dtype):
    # Half-precision inputs, as a projector under autocast returns them.
    batches = _stream(d, 6, autocast_dtype, seed=d)
    pred = DirectPredictor(d, backend="torch")
    got = _run_autocast(pred, batches, autocast_dtype)
    assert all(out.dtype == autocast_dtype for out, _, _ in got)
    assert pred.F.dtype == pred.W.dtype == torch.float32
    _assert_contract(got, batches, alpha=0.5, floor=TORCH_FLOOR)


@pytest.mark.parametrize("d", [64, 128])
def test_fp32_input_inside_autocast_gives_fp32_output_and_statistics(d):
    batches = _stream(d, 5, torch.float32, seed=d + 1)
    pred = DirectPredictor(d, backend="torch")
    got = _run_autocast(pred, batches, torch.bfloat16)
    assert all(out.dtype == torch.float32 for out, _, _ in got)  # the input's dtype, not autocast's
    _assert_contract(got, batches, alpha=0.5, floor=TORCH_FLOOR)
    # The output itself is z @ W_prev in fp32: the float64 product of the same values.
    W_prev = got[-2][2][0].double()
    assert rel_err(got[-1][0], batches[-1].double() @ W_prev) <= 1e-6


@pytest.mark.parametrize("autocast_dtype", HALF)
def test_directcopy_and_groups_under_autocast(autocast_dtype):
    batches = _stream(128, 5, autocast_dtype, seed=5)
    copy = DirectPredictor(128, alpha=1.0, backend="torch")
    _assert_contract(_run_autocast(copy, batches, autocast_dtype), batches, alpha=1.0, floor=TORCH_FLOOR)
    grouped = DirectPredictor(128, groups=2, backend="torch")
    _assert_contract(_run_autocast(grouped, batches, autocast_dtype), batches, alpha=0.5, floor=TORCH_FLOOR,
                     groups=2)


def test_trainable_W_gets_gradients_under_autocast():
    pred = DirectPredictor(16, trainable=True, freq=2)
    z = torch.randn(32, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pred(z.to(torch.bfloat16))
    out.float().square().sum().backward()
    assert pred.W.grad is not None and torch.isfinite(pred.W.grad).all() and z.grad is not None


# The triton backend interpreted on the CPU costs ~20 s per refresh at d > 64 (the block solver), so the CPU
# cases there are short streams; d = 256 runs on CUDA only (about 4 minutes per refresh interpreted).
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("autocast_dtype", HALF)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_triton_backend_under_autocast_register_solver(device, autocast_dtype, alpha):
    batches = _stream(64, 3, autocast_dtype, seed=64)
    pred = DirectPredictor(64, alpha=alpha, backend="triton").to(device)
    got = _run_autocast(pred, batches, autocast_dtype, device)
    assert all(out.dtype == autocast_dtype for out, _, _ in got)
    # Autocast no longer reaches the predictor: the same run outside any autocast region, bit for bit.
    plain = DirectPredictor(64, alpha=alpha, backend="triton").to(device)
    for (out, F, W), z in zip(got, batches, strict=True):
        assert torch.equal(plain(z.to(device)).cpu(), out)
        assert torch.equal(plain.F.cpu(), F) and torch.equal(plain.W.cpu(), W)
    # This stream (N = 2d, rho 0.3, F of condition ~1e9) moves F so far between steps that the first warm refresh
    # needs 8-9 Jacobi sweeps (fp32 too), past the default cap of 6: it is flagged, not held to the bound, and the
    # next refresh re-solves with the full budget (the cold solve took 11-12 of its 24). Only the last step is held.
    if alpha == 0.5:
        assert not bool(pred.full_solve_next.any())
    _assert_contract(got, batches, alpha=alpha, floor=TRITON_FLOOR, steps_checked=1)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("d", [96, 128])
def test_triton_backend_under_autocast_block_solver(device, d):
    # The first refresh is where the warm start and the polar step came back bf16 and W failed to build.
    batches = _stream(d, 1, torch.bfloat16, seed=d)
    pred = DirectPredictor(d, backend="triton").to(device)
    got = _run_autocast(pred, batches, torch.bfloat16, device)
    _assert_contract(got, batches, alpha=0.5, floor=TRITON_FLOOR)


@needs_cuda
@pytest.mark.parametrize("autocast_dtype", HALF)
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_triton_backend_under_cuda_autocast(d, autocast_dtype):
    batches = _stream(d, 8, autocast_dtype, seed=d)
    pred = DirectPredictor(d, backend="triton").cuda()
    got = _run_autocast(pred, batches, autocast_dtype, "cuda")
    _assert_contract(got, batches, alpha=0.5, floor=TRITON_FLOOR)


# The user's fp32 matmul precision setting is global state; each case runs in a fresh interpreter.
_PRECISION_CHECK = r"""
import torch
from fastpred.kernels._common import full_fp32_matmul

def state():
    out = []
    matmul, onednn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    for read in (torch.get_float32_matmul_precision, lambda: matmul.allow_tf32, lambda: matmul.fp32_precision,
                 lambda: onednn.fp32_precision):
        try:
            out.append(read())
        except RuntimeError:  # the legacy API read after the new one alone was used: PyTorch refuses to answer
            out.append("refused")
    return out

SETUP
before = state()
with full_fp32_matmul():
    # What every cuBLAS fp32 matmul asks (and raises on, if the legacy and new settings disagree):
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"  # no bf16 inner products on the CPU either
assert state() == before, (before, state())
print("ok")
"""


@pytest.mark.parametrize(
    "setup",
    [
        'torch.set_float32_matmul_precision("high")',  # the legacy API, as most training scripts do
        'torch.set_float32_matmul_precision("medium")',
        "torch.backends.cuda.matmul.allow_tf32 = True",
        'torch.backends.cuda.matmul.fp32_precision = "tf32"',  # the new API alone
        'torch.backends.fp32_precision = "tf32"',
        "pass",
    ],
)
def test_full_fp32_matmul_under_every_user_precision_setting(setup):
    code = _PRECISION_CHECK.replace("SETUP", setup)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_statistics_exact_with_user_precision_high():
    # The whole predictor with the common `set_float32_matmul_precision("high")` and bf16 autocast.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        batches = _stream(64, 5, torch.bfloat16, seed=9)
        pred = DirectPredictor(64, backend="torch")
        got = _run_autocast(pred, batches, torch.bfloat16)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    _assert_contract(got, batches, alpha=0.5, floor=TORCH_FLOOR)
