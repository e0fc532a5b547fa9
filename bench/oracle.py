"""Float64 evaluation of DirectPredictor's contract (DESIGN.md), written from the formulas for bench/.

    C(z) = z^T z / N;  F_1 = C(z_1);  F_t = rho F_{t-1} + (1 - rho) C(z_t)
    s, U = eigh(F);  q = clamp(s, 0) / max s;  W = U diag(max(q ** alpha + eps, 1e-4)) U^T

Everything is batched over groups: F and W are (G, m, m), z is split into G contiguous feature blocks.
"""

from __future__ import annotations

import torch

FLOOR = 1e-4


def correlation64(z: torch.Tensor, groups: int = 1) -> torch.Tensor:
    n, d = z.shape
    blocks = z.double().reshape(n, groups, d // groups).transpose(0, 1)  # (G, N, m)
    return blocks.mT @ blocks / n


def fold64(F: torch.Tensor | None, z: torch.Tensor, rho: float, groups: int = 1) -> torch.Tensor:
    C = correlation64(z, groups)
    return C if F is None else rho * F + (1.0 - rho) * C


def stream_F64(batches: list[torch.Tensor], rho: float, groups: int = 1) -> list[torch.Tensor]:
    """F after each batch of the stream, in float64."""
    F, out = None, []
    for z in batches:
        F = fold64(F, z, rho, groups)
        out.append(F)
    return out


def predictor64(F: torch.Tensor, *, alpha: float, eps: float) -> torch.Tensor:
    s, U = torch.linalg.eigh(F.double())
    q = s.clamp(min=0) / s[..., -1:]
    p = (q**alpha + eps).clamp(min=FLOOR)
    return (U * p[..., None, :]) @ U.mT


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error over the whole (stacked) tensor; anything non-finite is an infinite error."""
    diff = a.double() - ref.double()
    if not torch.isfinite(diff).all():
        return float("inf")
    return float(diff.norm() / ref.double().norm())
