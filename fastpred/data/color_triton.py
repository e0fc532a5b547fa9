"""Launcher for the fused colour kernel (`_color_kernel.py`); the torch reference is `augment.color_ref`."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

_MODULES: dict[bool, object] = {}


@contextlib.contextmanager
def _interpret_env(on: bool):
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if on:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old


def _kernels(interpret: bool):
    """The kernel module, compiled (CUDA) or interpreted (CPU); triton.jit decides at decoration time."""
    if interpret not in _MODULES:
        name = f"fastpred.data._color_kernel_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_color_kernel.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # triton resolves a kernel's globals through its module
        with _interpret_env(interpret):
            spec.loader.exec_module(mod)
        _MODULES[interpret] = mod
    return _MODULES[interpret]


def color_jitter(
    x: torch.Tensor,
    p: dict[str, torch.Tensor],
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    finish: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    block: int = 1024,
) -> torch.Tensor:
    """Fused per-sample colour jitter (random op order) + grayscale, and for samples with `finish` set also
    solarize + normalise, in one kernel: uint8 (N, 3, H, W), any strides (channels-last views welcome) ->
    out_dtype (N, 3, H, W). Samples without `finish` come out in [0, 1], ready for blur.
    `p` is `augment.sample_params(N)` on x's device. On a CPU tensor the kernel runs in Triton's interpreter."""
    assert x.dim() == 4 and x.shape[1] == 3 and x.dtype == torch.uint8, (x.shape, x.dtype)
    n, _, h, w = x.shape
    dev = x.device
    if finish is None:
        finish = torch.ones(n, dtype=torch.bool, device=dev)
    flags = (
        p["jitter"].to(torch.int32) + 2 * p["gray"].to(torch.int32) + 4 * finish.to(torch.int32)
        + 8 * p["solarize"].to(torch.int32)
    )
    out = torch.empty((n, 3, h, w), dtype=out_dtype, device=dev)
    if n == 0:
        return out
    f32 = {k: p[k].to(device=dev, dtype=torch.float32).contiguous() for k in ("b", "c", "s", "h")}
    order = p["order"].to(device=dev, dtype=torch.int32).contiguous()
    interpret = not x.is_cuda
    mod = _kernels(interpret)
    with _interpret_env(interpret), (torch.cuda.device(dev) if x.is_cuda else contextlib.nullcontext()):
        mod._color_kernel[(n,)](
            x, out, f32["b"], f32["c"], f32["s"], f32["h"], order, flags.contiguous(),
            float(mean[0]), float(mean[1]), float(mean[2]), float(std[0]), float(std[1]), float(std[2]),
            h, w, *x.stride(), *out.stride(),
            BLOCK=block, num_warps=4,
        )
    return out
