"""Launcher for the fused colour kernel (`_color_kernel.py`); the torch reference is `augment.color_ref`."""

from __future__ import annotations

import torch

from fastpred.data._color_kernel import _color_kernel
from fastpred.kernels._launch import check_grid, launch_device


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
    `p` is `augment.sample_params(N)` on x's device. CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set
    before triton is imported); without it this raises a ValueError, as every fastpred kernel does."""
    assert x.dim() == 4 and x.shape[1] == 3 and x.dtype == torch.uint8, (x.shape, x.dtype)
    launch = launch_device(x, _color_kernel, "color_jitter")
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
    with launch:
        _color_kernel[check_grid((n,), "color_jitter")](
            x, out, f32["b"], f32["c"], f32["s"], f32["h"], order, flags.contiguous(),
            float(mean[0]), float(mean[1]), float(mean[2]), float(std[0]), float(std[1]), float(std[2]),
            h, w, *x.stride(), *out.stride(),
            BLOCK=block, num_warps=4,
        )
    return out
