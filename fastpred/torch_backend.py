"""DirectPredictor's pure-PyTorch backend: fp32 statistics and `torch.linalg.eigh`.

This is the plain float32 evaluation of the contract in DESIGN.md (fp32 z^T z, fp32 EMA, fp32 eigh)
and the path on the CPU. Every function works on a batch of G independent blocks, so the grouped
(block-diagonal) predictor is the same code with G > 1. Nothing here branches on tensor values:
decisions are `torch.where` on the device, so the host only waits where `eigh` itself does.
"""

from __future__ import annotations

import torch

from fastpred.numerics import full_fp32_matmul


def grouped_gram(z: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum of outer products per feature block: (N, G*m) -> (G, m, m), accumulated in fp32."""
    n, d = z.shape
    blocks = z.float().reshape(n, groups, d // groups).transpose(0, 1)  # (G, N, m)
    with full_fp32_matmul():
        return blocks.mT @ blocks


def fold_(F: torch.Tensor, z: torch.Tensor, rho: float, first: torch.Tensor) -> torch.Tensor:
    """Fold one batch into F (see `fold_ema_`); returns valid, False (0-dim bool) if z^T z is non-finite."""
    C = grouped_gram(z, F.shape[0]) / z.shape[0]
    valid = torch.isfinite(C).all()
    fold_ema_(F, C, rho, first, valid)
    return valid


def fold_ema_(F: torch.Tensor, C: torch.Tensor, rho: float, first: torch.Tensor, valid: torch.Tensor) -> None:
    """F <- C on the first fold, rho F + (1 - rho) C after it; F is left untouched where `valid` is false.

    `where` (not arithmetic masking) keeps a NaN in C out of F: 0 * NaN would still be NaN.
    """
    ema = torch.where(first, C, F * rho + C * (1.0 - rho))
    F.copy_(torch.where(valid, ema, F))


def refresh_predictor_(
    F: torch.Tensor, U: torch.Tensor, W: torch.Tensor, *, alpha: float, eps: float, floor: float
) -> torch.Tensor:
    """Set W = U diag(p) U^T from F (G, m, m) in place; returns the (G,) mask of blocks that were updated.

    p = max((clamp(s, 0) / max s) ** alpha + eps, floor). A block whose F is non-finite or whose largest
    eigenvalue is not positive keeps its previous W (and eigenbasis U). For alpha = 1 and eps >= floor
    (DirectCopy) the floor never binds and W = F / max s + eps I: only eigenvalues are computed.
    """
    finite = torch.isfinite(F).all(dim=(-2, -1))  # (G,)
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    safe_F = torch.where(finite[:, None, None], F, eye)  # LAPACK/cuSOLVER must never see inf or NaN
    if alpha == 1.0 and eps >= floor:
        s_max = torch.linalg.eigvalsh(safe_F)[..., -1]  # (G,), ascending order
        new_W = safe_F / s_max[:, None, None] + eps * eye
        basis = None
    else:
        s, basis = torch.linalg.eigh(safe_F)  # (G, m), (G, m, m)
        s_max = s[..., -1]
        q = s.clamp(min=0) / s_max[:, None]
        p = (q.pow(alpha) + eps).clamp(min=floor)
        with full_fp32_matmul():
            new_W = (basis * p[:, None, :]) @ basis.mT
        new_W = 0.5 * (new_W + new_W.mT)  # exact symmetry; rounding leaves ~1 ulp of skew
    ok = finite & torch.isfinite(s_max) & (s_max > 0) & torch.isfinite(new_W).all(dim=(-2, -1))
    W.copy_(torch.where(ok[:, None, None], new_W, W))
    if basis is not None:
        U.copy_(torch.where(ok[:, None, None], basis, U))
    return ok
