"""Torch-only helpers shared by the kernels and by fastpred's torch code; no triton import.

`fastpred.kernels` is the bottom layer: it imports torch and triton, never the rest of fastpred. What the
two sides share lives here, below both (`fastpred.numerics` and `fastpred.torch_backend` re-export it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["FILTERS", "feature_blocks", "filter_weights", "full_fp32_matmul"]

#: Spectral filters g of W = U diag(p) U^T. "power" is DirectPred's family, p = (s / max s) ** alpha + eps; the others
#: are the log filters of Zhuo et al. (ICLR 2023) on sigma = sqrt(scale * s), the singular values of a batch of
#: `scale` rows whose correlation is F: log sigma, log(1 + sigma), log(1 + sigma^2). Index = the kernel's FILTER.
FILTERS = ("power", "log", "log1p", "log1p_sq")


def feature_blocks(z: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, G*m) -> (G, N, m): the contiguous feature blocks of a grouped predictor, as a view."""
    n, d = z.shape
    return z.reshape(n, groups, d // groups).transpose(0, 1)


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Run fp32 matmuls in true IEEE fp32 inside the block, whatever the caller's matmul precision setting.

    TF32 (CUDA) and bf16 (oneDNN on CPUs with AMX / AVX512-BF16, under `set_float32_matmul_precision("medium")`)
    keep 10 or 7 mantissa bits: enough for a backbone, but they wipe out the small eigenvalues of F that
    DirectPred's square root amplifies. The caller's setting is restored on exit.

    PyTorch >= 2.9 keeps a legacy precision (`set_float32_matmul_precision`, `allow_tf32`) and a new per-backend
    one (`backends.cuda.matmul.fp32_precision`), and every cuBLAS matmul raises if the two disagree. So the block
    moves both together: the legacy one only if the caller's state has one that can be read (a caller who used the
    new API alone has none), then the new ones, and puts back exactly what it found.
    """
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # pragma: no cover - PyTorch < 2.9: the legacy flag alone
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous
        return
    onednn = torch.backends.mkldnn.matmul
    saved = matmul.fp32_precision, onednn.fp32_precision
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the new API alone was used: the legacy precision is left as it is
        legacy = "highest"
    if legacy != "highest":
        torch.set_float32_matmul_precision("highest")
    matmul.fp32_precision = onednn.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy != "highest":
            torch.set_float32_matmul_precision(legacy)
        matmul.fp32_precision, onednn.fp32_precision = saved


def filter_weights(
    s: torch.Tensor, filter: str, scale: float, eps: float, floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """p = max(g(s) / g(max s) + eps, floor) for a log filter, in s's dtype; s (..., m) -> (p (..., m), ok (...,)).

    g(s) is log sigma, log(1 + sigma) or log(1 + sigma^2) with sigma^2 = scale * clamp(s, 0). Dividing by g(max s)
    (the largest, g being increasing) puts p on DirectPred's scale, so eps means the same for every filter; a cosine
    loss does not see the overall scale. ok is False where g(max s) <= 0 (all of F's spectrum at sigma <= 1 for
    "log", or max s <= 0): W is then kept. "log" is -inf at s = 0 and negative below sigma = 1, where the floor
    binds (the authors' code leaves those directions negative, or W non-finite at s = 0).
    """
    t = s.clamp(min=0) * scale  # sigma^2
    if filter == "log":
        g = 0.5 * t.log()
    elif filter == "log1p":
        g = t.sqrt().log1p()
    elif filter == "log1p_sq":
        g = t.log1p()
    else:
        raise ValueError(f"filter_weights: filter must be one of {', '.join(FILTERS[1:])}, got {filter!r}")
    top = g.amax(-1, keepdim=True)
    ok = top[..., 0] > 0
    p = (g / torch.where(top > 0, top, 1.0) + eps).clamp(min=floor)
    return p, ok
