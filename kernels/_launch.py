"""What every launcher needs: the device checked and pinned, the grid checked, true-fp32 torch matmuls.

Policy for CPU tensors (the same for every Triton kernel of fastpred, the augmentation's included): a
kernel runs on a non-CUDA tensor only if it was decorated by Triton's interpreter, i.e. TRITON_INTERPRET=1
was set before the kernel's module was imported; otherwise the launcher raises one ValueError line. Nothing
in fastpred switches the variable itself.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ._common import full_fp32_matmul

__all__ = ["check_grid", "full_fp32_matmul", "interpreted", "launch_device", "MAX_GRID"]

#: CUDA's grid limits: x up to 2^31 - 1 programs, y and z up to 65535. Long axes go on x.
MAX_GRID = (2**31 - 1, 65535, 65535)


def interpreted(kernel=None) -> bool:
    """Whether a @triton.jit kernel (default: this module's probe, decorated when the kernels were imported)
    was decorated by Triton's interpreter, i.e. TRITON_INTERPRET=1 was set when its module was imported."""
    return isinstance(_probe if kernel is None else kernel, InterpretedFunction)


@triton.jit
def _probe():
    pass


def launch_device(t: torch.Tensor, kernel, who: str) -> contextlib.AbstractContextManager:
    """Check that `kernel` can run on `t`'s device and pin the launch to it: on `t`'s GPU, not on whichever GPU
    is current (a no-op for CPU tensors under the interpreter)."""
    if interpreted(kernel):
        _fix_interpreter()
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    if interpreted(kernel):
        return contextlib.nullcontext()
    raise ValueError(
        f"{who}: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run "
        f"on {t.device.type} tensors; got {t.device.type} tensors"
    )


def check_grid(grid: tuple[int, ...], who: str) -> tuple[int, ...]:
    """The grid itself, or one ValueError line if an axis exceeds CUDA's limits (checked on the host, for free)."""
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID[: len(grid)], strict=True)):
        if size > limit:
            raise ValueError(f"{who}: grid axis {'xyz'[axis]} needs {size} programs, CUDA allows {limit}")
    return grid


# ---- fixes for bugs of Triton's interpreter that these kernels hit -----------------------------------------
# Applied once, by the first launch of an interpreted kernel: they change what the interpreter computes, never
# what is compiled for a GPU.


def _bf16_as_fp32(h):
    """An interpreter TensorHandle of bf16 (stored as uint16 bit patterns) -> fp32, exactly."""
    from triton.runtime.interpreter import TensorHandle

    bits = h.data.astype(np.uint32) << np.uint32(16)
    return TensorHandle(bits.view(np.float32), tl.float32)


def _fix_interpreter() -> None:
    import triton.runtime.interpreter as interp

    if getattr(interp, "_fastpred_fixed", False):
        return
    interp._fastpred_fixed = True

    # Every version to 3.8 at least: tl.dot multiplies bf16 operands as their uint16 bit patterns (garbage).
    # Widening them to fp32 first is exact (bf16 products are exact in fp32), as the tensor cores compute.
    create_dot = interp.InterpreterBuilder.create_dot

    def create_dot_bf16(self, a, b, d, *args, **kwargs):
        if a.dtype == tl.bfloat16:
            a = _bf16_as_fp32(a)
        if b.dtype == tl.bfloat16:
            b = _bf16_as_fp32(b)
        return create_dot(self, a, b, d, *args, **kwargs)

    interp.InterpreterBuilder.create_dot = create_dot_bf16

    # Triton < 3.8: a scalar's __index__ is int() of a 1-element array, an error with numpy >= 2.4; it broke
    # every loop bounded by a runtime scalar (`range(0, n, BLOCK)`). 3.8 squeezes the array first; so does this.
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8):
        patch_tensor = interp._patch_lang_tensor

        def patch_tensor_index(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        interp._patch_lang_tensor = patch_tensor_index

