"""DirectPredictor's pure-PyTorch backend: fp32 statistics and `torch.linalg.eigh`.

This is the plain float32 evaluation of the contract in DESIGN.md (fp32 z^T z, fp32 EMA, fp32 eigh)
and the path on the CPU. Every function works on a batch of G independent blocks, so the grouped
(block-diagonal) predictor is the same code with G > 1. This backend reads its flags on the host
(free on the CPU; on CUDA `torch.linalg.eigh` synchronises every refresh anyway); the distributed
fold (`fold_ema_`) alone decides on the device.
"""

from __future__ import annotations

import math

import torch

from fastpred.kernels._common import feature_blocks, filter_weights, full_fp32_matmul

__all__ = ["diagonal_is_finite", "feature_blocks", "fold_", "fold_ema_", "grouped_gram", "refresh_predictor_"]


def grouped_gram(z: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum of outer products per feature block: (N, G*m) -> (G, m, m), accumulated in fp32."""
    blocks = feature_blocks(z.float(), groups)
    with full_fp32_matmul():
        return blocks.mT @ blocks


def fold_(F: torch.Tensor, z: torch.Tensor, rho: float, *, first: bool) -> bool:
    """Fold one batch into F (G, m, m) with one fused baddbmm; returns whether it was folded.

    F_1 = C and F_t = rho F + (1 - rho) C, with C = z^T z / N per block. A result that is not finite (a
    NaN or inf in z, or an fp32 overflow in z^T z) is dropped whole, so F is never poisoned.
    """
    n = z.shape[0]
    beta, alpha = (0.0, 1.0 / n) if first else (rho, (1.0 - rho) / n)
    z = z.float()
    with full_fp32_matmul():
        if F.shape[0] == 1:  # plain addmm: measurably cheaper than a batch-of-one baddbmm on the CPU
            folded = torch.addmm(F[0], z.T, z, beta=beta, alpha=alpha).unsqueeze(0)
        else:
            blocks = feature_blocks(z, F.shape[0])
            folded = torch.baddbmm(F, blocks.mT, blocks, beta=beta, alpha=alpha)
    # Fast path: one scalar read, the trace, ~20 us cheaper on the CPU than isfinite().all(). The diagonal
    # entries are >= 0, so a finite trace means a finite diagonal; a non-finite one (a bad entry, or finite
    # entries summing past fp32's range) is settled by the exact check the device paths use.
    valid = math.isfinite(folded.diagonal(dim1=-2, dim2=-1).sum().item()) or bool(diagonal_is_finite(folded))
    if valid:
        F.copy_(folded)
    return valid


def diagonal_is_finite(folded: torch.Tensor) -> torch.Tensor:
    """Whether a (G, m, m) fold of z^T z is finite, from its diagonal alone: O(d) instead of O(d^2).

    A NaN or inf anywhere in z makes its column's sum of squares (a diagonal entry) NaN or inf, and so
    does an overflow of that sum; off the diagonal |sum_k z_ki z_kj| <= (G_ii + G_jj) / 2 stays finite
    whenever the diagonal is. Returns a 0-dim bool tensor, on the device (no host sync).
    """
    return torch.isfinite(folded.diagonal(dim1=-2, dim2=-1)).all()


def fold_ema_(F: torch.Tensor, C: torch.Tensor, rho: float, first: torch.Tensor, valid: torch.Tensor) -> None:
    """F <- C on the first fold, rho F + (1 - rho) C after it; F is left untouched where `valid` is false.

    `where` (not arithmetic masking) keeps a NaN in C out of F: 0 * NaN would still be NaN.
    """
    ema = torch.where(first, C, F * rho + C * (1.0 - rho))
    F.copy_(torch.where(valid, ema, F))


def refresh_predictor_(
    F: torch.Tensor,
    U: torch.Tensor,
    W: torch.Tensor,
    *,
    alpha: float,
    eps: float,
    floor: float,
    filter: str = "power",
    scale: float | None = None,
) -> torch.Tensor:
    """Set W = U diag(p) U^T from F (G, m, m) in place; returns the (G,) mask of blocks that were updated.

    p = max((clamp(s, 0) / max s) ** alpha + eps, floor), or for a log filter (`filter_weights`, fp32)
    p = max(g(sigma) / g(sigma_max) + eps, floor) with sigma = sqrt(scale * clamp(s, 0)). F is finite by
    construction (`fold_` drops non-finite batches). A block whose largest eigenvalue is not positive (an all-zero
    F), or whose g(sigma_max) is not, keeps its previous W; U always becomes F's eigenbasis. For the power filter
    with alpha = 1 and eps >= floor (DirectCopy) the floor never binds and W = F / max s + eps I: only eigenvalues
    are computed. W is symmetric up to fp32 rounding of the product.
    """
    ok = None
    if filter == "power" and alpha == 1.0 and eps >= floor:
        s_max = torch.linalg.eigvalsh(F)[..., -1]  # (G,), ascending order
        new_W = F / s_max[:, None, None]
        new_W.diagonal(dim1=-2, dim2=-1).add_(eps)
    else:
        s, basis = torch.linalg.eigh(F)  # (G, m), (G, m, m)
        U.copy_(basis)  # F's eigenbasis whatever happens to W below: only the warm start of a later solve
        s_max = s[..., -1]
        if filter == "power":
            q = s.clamp(min=0).div_(s_max[:, None])
            p = (q.sqrt_() if alpha == 0.5 else q.pow_(alpha)).add_(eps).clamp_(min=floor)
        else:
            p, ok = filter_weights(s, filter, scale, eps, floor)
        scaled = basis * p[:, None, :]
        with full_fp32_matmul():
            new_W = (scaled[0] @ basis[0].T).unsqueeze(0) if F.shape[0] == 1 else scaled @ basis.mT
    # F is finite, so W is finite wherever max s > 0 (q <= 1 and p >= floor > 0).
    ok = s_max > 0 if ok is None else ok & (s_max > 0)
    if bool(ok.all()):  # the usual case: a plain copy instead of a select over every element
        W.copy_(new_W)
    else:
        W.copy_(torch.where(ok[:, None, None], new_W, W))
    return ok
