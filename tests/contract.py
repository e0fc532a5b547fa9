"""An independent evaluation of DirectPredictor's numerical contract (DESIGN.md), for the tests.

Written from the formulas, not from fastpred's code path: `evaluate_stream` runs the contract in any
dtype (float64 is the oracle; float32 is "the plain float32 evaluation" of the accuracy rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOOR = 1e-4


@dataclass
class Step:
    out: torch.Tensor  # z @ W_prev
    F: torch.Tensor
    W: torch.Tensor


def predictor_from(
    F: torch.Tensor, W_prev: torch.Tensor, *, alpha: float, eps: float, filter: str = "power", scale: float = 1.0
) -> torch.Tensor:
    s, U = torch.linalg.eigh(F)
    if not torch.isfinite(s).all() or s[-1] <= 0:
        return W_prev
    if filter == "power":
        q = s.clamp(min=0) / s[-1]
        p = torch.clamp(q**alpha + eps, min=FLOOR)
    else:  # Zhuo et al.'s log filters of the singular values sigma of a batch of `scale` rows with correlation F
        sigma = (scale * s.clamp(min=0)).sqrt()
        g = {"log": torch.log(sigma), "log1p": torch.log(1 + sigma), "log1p_sq": torch.log(1 + sigma**2)}[filter]
        if g[-1] <= 0:
            return W_prev
        p = torch.clamp(g / g[-1] + eps, min=FLOOR)
    return U @ torch.diag(p) @ U.T


def evaluate_stream(
    batches: list[torch.Tensor], *, rho: float, eps: float, alpha: float, freq: int, dtype: torch.dtype,
    filter: str = "power", scale: float = 1.0,
) -> list[Step]:
    d = batches[0].shape[1]
    F = None
    W = torch.eye(d, dtype=dtype)
    folds = 0
    steps = []
    for z in batches:
        x = z.to(dtype)
        out = x @ W
        C = x.T @ x / x.shape[0]
        if torch.isfinite(C).all():
            F = C if F is None else rho * F + (1 - rho) * C
            folds += 1
            if folds % freq == 0:
                W = predictor_from(F, W, alpha=alpha, eps=eps, filter=filter, scale=scale)
        steps.append(Step(out, F.clone() if F is not None else torch.zeros(d, d, dtype=dtype), W.clone()))
    return steps


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of `a` against the float64 `ref`; NaN anywhere is an infinite error."""
    diff = a.double() - ref.double()
    if not torch.isfinite(diff).all():
        return float("inf")
    scale = ref.double().norm()
    return float(diff.norm() / scale) if scale > 0 else float(diff.norm())


def allowed_error(plain_fp32: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    """DESIGN's accuracy rule: `floor`, or twice the plain float32 evaluation's error, whichever is larger."""
    return max(floor, 2.0 * rel_err(plain_fp32, ref))


def decaying_features(n: int, d: int, *, steps: int, seed: int, decay: float = 0.85) -> list[torch.Tensor]:
    """Batches whose correlation has a geometrically decaying spectrum in a slowly rotating basis."""
    g = torch.Generator().manual_seed(seed)
    scales = decay ** torch.arange(d, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    drift = 0.02 * torch.randn(d, d, generator=g, dtype=torch.float64)
    drift = drift - drift.T  # a small rotation per step keeps the stream non-stationary, like training
    rotation = torch.linalg.matrix_exp(drift)
    batches = []
    for _ in range(steps):
        basis = basis @ rotation
        batches.append(((torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.T).float())
    return batches


def run_module(pred, batches, device="cpu"):
    """Feed the stream; record (out, F, W) after every step, on the CPU."""
    steps = []
    for z in batches:
        out = pred(z.to(device))
        steps.append((out.detach().cpu(), pred.F[0].detach().cpu().clone(), pred.W[0].detach().cpu().clone()))
    return steps


def assert_stream_matches(got, batches, *, rho, eps, alpha, freq, floor, filter="power", scale=1.0):
    """Out, F and W of every step within DESIGN's accuracy rule: `floor`, or twice the plain float32 error."""
    spectrum = dict(rho=rho, eps=eps, alpha=alpha, freq=freq, filter=filter, scale=scale)
    exact = evaluate_stream(batches, **spectrum, dtype=torch.float64)
    plain = evaluate_stream(batches, **spectrum, dtype=torch.float32)
    for t, ((out, F, W), ref, fp32) in enumerate(zip(got, exact, plain, strict=True)):
        checks = (("out", out, ref.out, fp32.out), ("F", F, ref.F, fp32.F), ("W", W, ref.W, fp32.W))
        for name, value, want, baseline in checks:
            err, bound = rel_err(value, want), allowed_error(baseline, want, floor)
            assert err <= bound, f"step {t}: {name} error {err:.2e} > allowed {bound:.2e}"
