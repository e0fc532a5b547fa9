"""Eigensolve + construction of W from F, on a realistic stream, every formulation side by side.

Input: F at steps t-1 and t of a feature stream with a decaying spectrum (rho 0.3: F moves a lot between
steps; rho 0.99: it barely moves), fp32, stacked (B, n, n) for the grouped predictor (B = 1 is the plain one).
Warm-started solvers get the fp32 eigenbasis of F_{t-1}, as the previous step would leave it.
Nominal work per matrix: 9 n^3 flops for a symmetric eigendecomposition with vectors (tridiagonal QR, Golub
& Van Loan) + 2 n^3 for U diag(p) U^T; F read and W written once.
The error recorded is W's against the float64 contract evaluated on the float64 stream, next to the error of
the plain fp32 evaluation (fp32 F, fp32 eigh) that the contract's accuracy rule refers to.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.formulations import SOLVERS, torch_eigh_W
from bench.harness import ALPHA, BATCHED, D_GRID, EPS, STREAM_RHOS, measure, needs_triton
from bench.oracle import predictor64, rel_err, stream_F64
from bench.stream import feature_stream

pytestmark = pytest.mark.usefixtures("ieee_fp32")

SHAPES = [(1, n) for n in D_GRID] + BATCHED
CASES = [
    (b, n, rho, provider)
    for b, n in SHAPES
    for rho in STREAM_RHOS
    for provider in SOLVERS
    if not (provider == "torch-eigh-loop" and b == 1)  # identical to torch-eigh for one matrix
]


@functools.lru_cache(maxsize=1)  # cases are ordered provider-fastest
def _inputs(b: int, n: int, rho: float) -> dict[str, torch.Tensor | float]:
    d = b * n
    batches = feature_stream(max(1024, 2 * d), d, seed=7 * d + int(100 * rho))
    F_prev64, F64 = stream_F64(batches, rho, groups=b)[-2:]
    F_prev, F = F_prev64.float(), F64.float()  # (B, n, n)
    W_ref = predictor64(F64, alpha=ALPHA, eps=EPS)
    U_prev = torch.linalg.eigh(F_prev).eigenvectors
    plain = rel_err(torch_eigh_W(F, U_prev, ALPHA, EPS)[0], W_ref)
    return {"F": F, "U_prev": U_prev, "W_ref": W_ref, "err_plain_fp32": plain}


@pytest.mark.parametrize(
    ("b", "n", "rho", "provider"), CASES, ids=[f"{p}-B{b}-n{n}-rho{rho}" for b, n, rho, p in CASES]
)
def test_predictor_from_F(benchmark, ceiling, b, n, rho, provider):
    if provider.startswith("fastpred-triton"):
        needs_triton()
    x = _inputs(b, n, rho)
    F, U_prev = x["F"], x["U_prev"]
    solve = SOLVERS[provider]
    W, ok = solve(F, U_prev, ALPHA, EPS)  # also compiles, and resolves missing kernels before timing
    info = {} if ok is None else {"ok_frac": float(ok.float().mean())}  # converged and W written
    measure(
        benchmark,
        lambda: solve(F, U_prev, ALPHA, EPS),
        ceiling=ceiling,
        flops=11.0 * b * n**3,
        bytes_moved=4.0 * 2 * b * n * n,
        provider=provider,
        baseline="torch-eigh",
        case=f"B={b} n={n} rho={rho}",
        B=b,
        n=n,
        rho=rho,
        err=rel_err(W, x["W_ref"]),
        err_of="W",
        err_plain_fp32=x["err_plain_fp32"],
        **info,
    )
