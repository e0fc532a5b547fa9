"""What the kernels' launchers decide on the host, checked where no GPU can be: grids against CUDA's limits at
sizes too large to launch here, the tournament of the block solver, 64-bit offsets into z, the half-precision
path under the interpreter, and the interpreter-off run of the GPU check's test files."""

import os
import re
import subprocess
import sys
from pathlib import Path

import fastpred.kernels  # noqa: F401
import pytest
import torch
import triton
import triton.language as tl
from devices import HAS_CUDA, TRITON_DEVICES, needs_interpreter
from fastpred.kernels import corr_ema
from fastpred.kernels._launch import MAX_GRID, check_grid

corr = sys.modules["fastpred.kernels.corr_ema"]
eigh = sys.modules["fastpred.kernels.eigh"]
pred = sys.modules["fastpred.kernels.predictor"]
REPO = Path(__file__).resolve().parents[1]


def _fits(grid):
    return all(size <= limit for size, limit in zip(grid, MAX_GRID[: len(grid)], strict=True))


def test_check_grid_names_the_axis():
    assert check_grid((2**31 - 1, 65535, 65535), "k") == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"^k: grid axis y needs 65536 programs, CUDA allows 65535$"):
        check_grid((1, 65536), "k")


@pytest.mark.parametrize("n", [13313, 23105, 65536])
def test_solver_and_predictor_grids_fit_at_large_n(n):
    # The block solver's rotation kernel had n^2 tasks on axis y from n = 13313, the W build from n = 23105.
    n_pad = 2 * triton.cdiv(triton.cdiv(n, 32), 2) * 32
    sweep, rotate, status = eigh._block_grids(3, n_pad)
    assert rotate[0] > 65535 and rotate[1] == 3  # the long axis is x
    finite, build = pred._grids(3, n)
    assert build[1] == 3 and (n < 23105 or build[0] > 65535)
    assert all(_fits(g) for g in (sweep, rotate, status, finite, build))


def test_corr_ema_split_grid_fits_past_65535_splits():
    plan = corr._plan(N=32 * 70000, d=256, G=2, splits=70000, sms=None)
    assert plan.splits == 70000
    (partial, finish) = plan.grids
    assert partial == (plan.n_prog * 70000, 2) and finish == (plan.n_prog, 2)
    assert all(_fits(g) for g in plan.grids)
    with pytest.raises(ValueError, match="corr_ema: grid axis y"):
        corr._plan(N=8, d=65536, G=65536, splits=None, sms=None)  # 65536 feature blocks of 1


@needs_interpreter
def test_split_kernel_flattened_grid_matches_one_pass():
    torch.manual_seed(0)
    z = torch.randn(200, 40)
    one, split = torch.zeros(40, 40), torch.zeros(40, 40)
    corr_ema(one, z, 0.0, splits=1)
    corr_ema(split, z, 0.0, splits=7)  # 7 slices x 3 tiles on axis x
    torch.testing.assert_close(split, one, rtol=1e-6, atol=1e-6)


@triton.jit
def _tournament_kernel(out_ptr, nb, H_PAD: tl.constexpr):
    rnd = tl.program_id(0)
    h = nb // 2
    k = tl.arange(0, H_PAD)
    p, q = eigh._pair_blocks(rnd, k, nb)
    tl.store(out_ptr + rnd * 2 * h + 2 * k, p, mask=k < h)
    tl.store(out_ptr + rnd * 2 * h + 2 * k + 1, q, mask=k < h)


@needs_interpreter
@pytest.mark.parametrize("nb", [2, 4, 6, 10, 16])
def test_block_pairs_are_computed_and_form_a_round_robin(nb):
    # The pairs come from the round number by arithmetic in the kernels: no cached device table that a first call
    # during CUDA-graph capture would leave in the graph's pool, unwritten until the first replay.
    assert not hasattr(eigh, "_round_pairs")
    h = nb // 2
    out = torch.full((nb - 1, h, 2), -1, dtype=torch.int32)
    _tournament_kernel[(nb - 1,)](out, nb, H_PAD=triton.next_power_of_2(h))
    met = set()
    for rnd in range(nb - 1):
        blocks = out[rnd].flatten().tolist()
        assert sorted(blocks) == list(range(nb))  # each round is a perfect matching
        met |= {frozenset(pair) for pair in out[rnd].tolist()}
    assert len(met) == nb * (nb - 1) // 2  # every two blocks meet exactly once


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_row_offsets_are_64_bit(device):
    # z's row stride fits in int32 (Triton passes it as i32) but row 2 starts 2^32 - 32 elements in: in 32-bit
    # arithmetic that offset wraps to -32, which lands on this view's storage offset, i.e. on other data. The
    # storage (8 GiB of fp16) is virtual memory: only the pages of the three rows are ever touched.
    if device == "cuda" and torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs 12 GiB of GPU memory")
    stride, d = 2**31 - 16, 8
    base = torch.empty(2 * stride + 32 + d, dtype=torch.float16, device=device)
    z = base.as_strided((3, d), (stride, 1), storage_offset=32)
    base[:32 + d] = 100.0  # what a wrapped offset would read
    z.copy_(torch.arange(3 * d, dtype=torch.float16, device=device).view(3, d) / 8)
    F = torch.zeros(d, d, device=device)
    corr_ema(F, z, 0.0)
    z64 = z.double()
    torch.testing.assert_close(F.double(), z64.T @ z64 / 3, rtol=1e-6, atol=1e-6)


@needs_interpreter
def test_interpreter_multiplies_bf16_as_numbers():
    # The interpreter's tl.dot multiplied bf16 bit patterns as integers (fastpred.kernels._launch fixes it), which
    # is why corr_ema once upcast bf16 there and its half-precision path had never run.
    torch.manual_seed(1)
    z = torch.randn(64, 16).bfloat16()
    F = torch.zeros(16, 16)
    corr_ema(F, z, 0.0)
    z64 = z.double()
    torch.testing.assert_close(F.double(), z64.T @ z64 / 64, rtol=1e-6, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 2])
def test_half_precision_takes_the_tensor_core_path(monkeypatch, dtype, splits):
    # Under the interpreter too, bf16/fp16 z run the FP32_DOT=False code (chunks from zero, added in fp32).
    seen = []
    spied = (corr._corr_ema_kernel, corr._corr_partial_kernel)
    cls = type(corr._corr_ema_kernel)
    getitem = cls.__getitem__

    def spy(self, grid):
        launch = getitem(self, grid)

        def run(*args, **kwargs):
            if self in spied:
                seen.append(kwargs["FP32_DOT"])
            return launch(*args, **kwargs)

        return run

    monkeypatch.setattr(cls, "__getitem__", spy)
    torch.manual_seed(2)
    z = torch.randn(300, 48).to(dtype)
    F = torch.zeros(48, 48)
    corr_ema(F, z, 0.0, splits=splits)
    assert seen == [False]
    z64 = z.double()
    torch.testing.assert_close(F.double(), z64.T @ z64 / 300, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: tensor cores round their accumulation, the CPU does not")
def test_cuda_half_precision_accumulates_like_ieee_fp32():
    # N = 16384, d = 32: a tensor-core accumulator carried over all of N gave 4e-5 to 2e-4 in an emulation; chunks
    # reduced from zero and added in IEEE fp32 keep to the plain fp32 error (9e-7).
    torch.manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        z = (torch.randn(16384, 32, device="cuda") + 0.5).to(dtype)
        z64 = z.double()
        ref = z64.T @ z64 / z.shape[0]
        F = torch.zeros(32, 32, device="cuda")
        corr_ema(F, z, 0.0, splits=1)
        err = ((F.double() - ref).norm() / ref.norm()).item()
        assert err <= 3e-6, (dtype, err)


def _gpu_check_test_files() -> list[str]:
    script = (REPO / ".ci" / "gpu-check").read_text()
    files = re.findall(r"tests/test_\w+\.py", script)
    assert "tests/test_kernels_corr_ema.py" in files
    return [f for f in files if f != "tests/test_data_augment.py" or _has_torchvision()]


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU, .ci/gpu-check runs these files itself")
@needs_interpreter  # and so the run below, with the interpreter off, does not start itself again
def test_gpu_check_files_pass_with_the_interpreter_off():
    # What a GPU machine sees (kernels compiled, not interpreted), minus the GPU: every CPU case of a Triton
    # kernel must skip with a reason, never launch on a CPU tensor. Only the kernel and triton-backend files
    # (what does not need the interpreter runs: argument checks, torch-only helpers), so it stays short.
    here = Path(__file__).name
    files = [f for f in _gpu_check_test_files() if ("kernels" in f or "triton" in f) and not f.endswith(here)]
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\d+ passed, \d+ skipped in ", summary) and "failed" not in summary and "error" not in summary
    assert "Triton kernels on CPU tensors need TRITON_INTERPRET=1" in result.stdout  # the skip reason
