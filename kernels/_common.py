"""Torch-only helpers shared by the kernels and by fastpred's torch code; no triton import.

`fastpred.kernels` is the bottom layer: it imports torch and triton, never the rest of fastpred. What the
two sides share lives here, below both (`fastpred.numerics` and `fastpred.torch_backend` re-export it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["feature_blocks", "full_fp32_matmul"]


def feature_blocks(z: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, G*m) -> (G, N, m): the contiguous feature blocks of a grouped predictor, as a view."""
    n, d = z.shape
    return z.reshape(n, groups, d // groups).transpose(0, 1)


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Run fp32 matmuls in true IEEE fp32 inside the block, whatever the user's global TF32 setting.

    TF32 keeps 10 mantissa bits: enough for a backbone, but it wipes out the small eigenvalues of F
    that DirectPred's square root amplifies. The user's setting is restored on exit. PyTorch >= 2.9
    refuses to mix its legacy and new precision APIs, and reading the new one works after either, so
    the new one is used where it exists.
    """
    if not torch.cuda.is_initialized():  # no CUDA matmul can run; the CPU has no TF32
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # pragma: no cover - PyTorch < 2.9
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous
