"""What every launcher needs: the launch device pinned, and true-fp32 torch matmuls around kernels."""

from __future__ import annotations

import contextlib

import torch

from fastpred.numerics import full_fp32_matmul

__all__ = ["full_fp32_matmul", "on_device"]


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on `t`'s GPU, not on whichever GPU is current (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
