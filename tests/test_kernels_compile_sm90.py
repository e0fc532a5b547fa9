"""Every Triton kernel (the predictor's and the augmentation's) compiles for a Hopper GPU (sm_90a) here,
without one, and ptxas reports its spills.

The interpreter checks what the kernels compute, not whether they compile for a GPU or fit its
registers; this closes part of that gap on machines with no GPU. It runs Triton's own compiler and
the ptxas that ships with Triton, in a subprocess so TRITON_INTERPRET (set for the other tests) is off.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests run the real kernels")

COMPILE = r'''
import importlib, inspect, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastpred.data._color_kernel as color
eigh, corr, pred, orth = (importlib.import_module("fastpred.kernels." + m)
                          for m in ("eigh", "corr_ema", "predictor", "orth_iter"))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def compile90(fn, types, constexprs, num_warps):
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm

def spills(fn, types, constexprs, num_warps):
    ptx = compile90(fn, types, constexprs, num_warps)["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(re.search(r"(\d+) bytes spill stores", out.stderr + out.stdout).group(1))

f32 = "*fp32"
jacobi = dict(A_ptr=f32, U0_ptr=f32, s_ptr=f32, U_ptr=f32, conv_ptr="*i8", sweeps_ptr="*i32", cap_ptr="*i32",
              tol="fp32")
orthk = dict(F_ptr=f32, U0_ptr=f32, s_ptr=f32, Q_ptr=f32, conv_ptr="*i8", iters_ptr="*i32", cap_ptr="*i32",
             tol="fp32")
ema = dict(z_ptr=f32, F_ptr=f32, mean_ptr=f32, first_ptr="*i8", valid_ptr="*i8", rho="fp32", scale_new="fp32",
           scale_first="fp32")
build = dict(s_ptr=f32, U_ptr=f32, W_ptr=f32, ok_ptr="*i8", bad_ptr="*i8", alpha="fp32", eps="fp32", floor="fp32")
flags = dict(HAS_FIRST=True, HAS_VALID=True, HAS_MEAN=True)
report = {
    "jacobi P=32": spills(eigh._jacobi_kernel, jacobi, dict(P=32, HAS_U0=True, HAS_CAP=True), 4),
    "jacobi P=64": spills(eigh._jacobi_kernel, jacobi, dict(P=64, HAS_U0=True, HAS_CAP=True), 8),
    "orth_iter P=32": spills(orth._orth_iter_kernel, orthk, dict(P=32, HAS_U0=True, HAS_CAP=True), 4),
    "orth_iter P=64": spills(orth._orth_iter_kernel, orthk, dict(P=64, HAS_U0=True, HAS_CAP=True), 8),
    "pair sweep": spills(eigh._pair_sweep_kernel, dict(A_ptr=f32, Q_ptr=f32, active_ptr="*i8"),
                         dict(P=64, HALF=32), 8),
    "pair rotate": spills(eigh._pair_rotate_kernel, dict(A_ptr=f32, V_ptr=f32, Q_ptr=f32, active_ptr="*i8",
                          part_ptr=f32), dict(P=64, HALF=32, KC=16), 8),
    "sweep status": spills(eigh._sweep_status_kernel, dict(part_ptr=f32, off_ptr=f32, thr_ptr=f32, cap_ptr="*i32",
                           sweeps_ptr="*i32", polished_ptr="*i8", active_ptr="*i8"), dict(BLOCK=128), 4),
    "corr_ema fp32": spills(corr._corr_ema_kernel, ema, dict(BLOCK=64, BLOCK_N=32, FP32_DOT=True, **flags), 4),
    "corr_ema bf16": spills(corr._corr_ema_kernel, dict(ema, z_ptr="*bf16"),
                            dict(BLOCK=64, BLOCK_N=32, FP32_DOT=False, **flags), 4),
    "corr_ema partial": spills(corr._corr_partial_kernel, dict(z_ptr=f32, part_ptr=f32, colsum_ptr=f32,
                               valid_ptr="*i8"), dict(BLOCK=64, BLOCK_N=32, FP32_DOT=True, HAS_VALID=True,
                               HAS_MEAN=True), 4),
    "corr_ema finish": spills(corr._corr_finish_kernel, dict(part_ptr=f32, colsum_ptr=f32, F_ptr=f32, mean_ptr=f32,
                              first_ptr="*i8", valid_ptr="*i8", rho="fp32", scale_new="fp32", scale_first="fp32"),
                              dict(BLOCK=64, **flags), 4),
    "predictor sqrt": spills(pred._predictor_kernel, build, dict(BLOCK=64, BLOCK_K=32, ALPHA_MODE=1), 4),
    "predictor pow": spills(pred._predictor_kernel, build, dict(BLOCK=64, BLOCK_K=32, ALPHA_MODE=0), 4),
    "rows_finite": spills(pred._rows_finite_kernel, dict(U_ptr=f32, bad_ptr="*i8"), dict(BLOCK_R=64, BLOCK_C=32), 4),
    "augment colour": spills(color._color_kernel, dict(x_ptr="*u8", out_ptr=f32, b_ptr=f32, c_ptr=f32, s_ptr=f32,
                             h_ptr=f32, order_ptr="*i32", flags_ptr="*i32", **dict.fromkeys(
                             ["mean0", "mean1", "mean2", "std0", "std1", "std2"], "fp32")), dict(BLOCK=1024), 4),
}
# corr_ema's half-precision path must start each chunk's tensor-core dot from zero (its accumulator operand a
# constant 0) and add it to the running sum in fp32: Triton folds a plain `acc += dot` into the dot's accumulator.
ttir = compile90(corr._corr_ema_kernel, dict(ema, z_ptr="*bf16"), dict(BLOCK=64, BLOCK_N=32, FP32_DOT=False, **flags),
                 4)["ttir"]
dots = re.findall(r"tt\.dot %[\w.]+, %[\w.]+, (%[\w.]+)", ttir)
from_zero = [bool(re.search(rf"^\s*{re.escape(a)} = arith\.constant dense<0\.0+e\+00>", ttir, re.M)) for a in dots]
print(json.dumps({"triton": triton.__version__, "spills": report, "half dots from zero": from_zero}))
'''


#: Spill bytes per thread allowed where a kernel is not spill-free, per Triton version (major.minor), as
#: measured when the budget was set; a version not listed gets the newest budget.
#: - The 64 x 64 Jacobi program (and the block-pair sweep, the same register code) holds A and V (8192 fp32
#:   values) plus gather temporaries in 8 warps: 616 bytes per thread under 3.8, cached in L1, tolerable until a
#:   GPU measurement says otherwise; the budget guards it from growing.
#: - Triton 3.6 (the lent GPU machine's) spills a little in corr_ema's fp32 kernels, where 3.8 spills nothing:
#:   24 and 12 bytes per thread (8 for the split-K kernel before its offsets became 64-bit).
#: - The 64 x 64 orth_iter program holds F, Q and F Q (and the Householder loop's temporaries): 1152 bytes per
#:   thread under 3.8 (P = 32: none), after F is reloaded inside its loop and the column sort is a gather;
#:   not measured under 3.6.
SPILL_BUDGET = {
    "3.6": {"jacobi P=64": 1024, "pair sweep": 1024, "corr_ema fp32": 24, "corr_ema partial": 12},
    "3.8": {"jacobi P=64": 1024, "orth_iter P=64": 1536, "pair sweep": 1024},
}


def budget(version: str) -> dict[str, int]:
    major_minor = ".".join(version.split(".")[:2])
    known = sorted(SPILL_BUDGET, key=lambda v: tuple(map(int, v.split("."))))
    return SPILL_BUDGET.get(major_minor, SPILL_BUDGET[known[-1]])


def test_kernels_compile_for_sm90_within_register_budget():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    allowed = budget(report["triton"])
    over = {name: size for name, size in report["spills"].items() if size > allowed.get(name, 0)}
    assert not over, (report["triton"], over, report["spills"])
    assert report["half dots from zero"] == [True], report["half dots from zero"]
