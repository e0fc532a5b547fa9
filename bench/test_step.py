"""The whole predictor update of one training step, every formulation side by side.

One step = out = z @ W (the predictor's output), fold z into F, eigensolve, rebuild W: every provider does all
of it, so fastpred is timed through its public forward. Nominal work: 4 N d^2 flops (z @ W and z^T z) +
11 d^3 (eigh with vectors and the reconstruction); z read, out written, F read and written, W written.
The timed calls walk the same stream back and forth (ping-pong), so F moves between calls as in training.
The error recorded is W's after the stream's first pass, against the float64 contract.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

from bench.formulations import FastpredStep, OfficialStep, PlainTorchStep
from bench.harness import ALPHA, D_GRID, DEVICE, EPS, N_GRID, RHO, measure, skip_official_if_too_big
from bench.oracle import predictor64, rel_err, stream_F64
from bench.stream import feature_stream, ping_pong
from fastpred import DirectPredictor

pytestmark = pytest.mark.usefixtures("ieee_fp32")

STEPPERS = {
    "official": OfficialStep,
    "torch-plain": PlainTorchStep,
    "fastpred": FastpredStep,  # DirectPredictor's defaults: the backend users get
}
if "backend" in inspect.signature(DirectPredictor).parameters:
    # "auto" against the torch path it must never be slower than.
    STEPPERS["fastpred-torch"] = functools.partial(FastpredStep, backend="torch")

CASES = [(d, n, provider) for d in D_GRID for n in N_GRID for provider in STEPPERS]


@functools.lru_cache(maxsize=1)  # cases are ordered provider-fastest
def _inputs(n: int, d: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    batches = feature_stream(n, d, seed=3 * d + n)
    return batches, predictor64(stream_F64(batches, RHO)[-1], alpha=ALPHA, eps=EPS)[0]


@pytest.mark.parametrize(("d", "n", "provider"), CASES, ids=[f"{p}-d{d}-N{n}" for d, n, p in CASES])
def test_predictor_step(benchmark, ceiling, d, n, provider):
    if provider == "official":
        skip_official_if_too_big(n, d)
    batches, W_ref = _inputs(n, d)
    stepper = STEPPERS[provider](d, rho=RHO, eps=EPS, alpha=ALPHA, device=DEVICE)
    with torch.no_grad():
        for z in batches:
            stepper.step(z)
        err = rel_err(stepper.matrix(), W_ref)
    ring = ping_pong(batches)

    @torch.no_grad()
    def step() -> None:
        stepper.step(next(ring))

    info = {"backend": stepper.backend()} if hasattr(stepper, "backend") else {}
    measure(
        benchmark,
        step,
        ceiling=ceiling,
        flops=4.0 * n * d * d + 11.0 * d**3,
        bytes_moved=4.0 * (2 * n * d + 3 * d * d),
        provider=provider,
        baseline="torch-plain",
        case=f"d={d} N={n}",
        d=d,
        N=n,
        err=err,
        err_of="W",
        **info,
    )
