"""Correlation EMA update F <- rho F + (1 - rho) z^T z / N, every formulation side by side.

Nominal work, the same for every provider: 2 N d^2 flops, N d + 2 d^2 fp32 words moved (DESIGN.md).
The error recorded is F's after one fold from a realistic F, against the float64 fold.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.formulations import FOLDS
from bench.harness import D_GRID, N_GRID, RHO, measure, needs_triton, skip_official_if_too_big
from bench.oracle import fold64, rel_err
from bench.stream import feature_stream

pytestmark = pytest.mark.usefixtures("ieee_fp32")

CASES = [(d, n, provider) for d in D_GRID for n in N_GRID for provider in FOLDS]


@functools.lru_cache(maxsize=1)  # cases are ordered provider-fastest, so one entry serves a whole shape
def _inputs(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z_prev, z = feature_stream(n, d, seed=d + n, steps=2)
    F_prev64 = fold64(None, z_prev, RHO)[0]
    return F_prev64.float(), z, fold64(F_prev64[None], z, RHO)[0]


@pytest.mark.parametrize(("d", "n", "provider"), CASES, ids=[f"{p}-d{d}-N{n}" for d, n, p in CASES])
def test_corr_ema(benchmark, ceiling, d, n, provider):
    if provider == "official":
        skip_official_if_too_big(n, d)
    if provider == "fastpred-triton":
        needs_triton()
    F_prev, z, F_ref = _inputs(n, d)
    fold = FOLDS[provider]
    F = F_prev.clone()
    fold(F, z, RHO)
    err = rel_err(F, F_ref)
    measure(
        benchmark,
        lambda: fold(F, z, RHO),
        ceiling=ceiling,
        flops=2.0 * n * d * d,
        bytes_moved=4.0 * (n * d + 2 * d * d),
        provider=provider,
        baseline="torch-addmm",
        case=f"d={d} N={n}",
        d=d,
        N=n,
        err=err,
        err_of="F",
    )
