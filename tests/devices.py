"""The devices tests run on, and the marks that skip what this machine cannot run.

`DEVICES`: torch code, the CPU always and CUDA when present. `TRITON_DEVICES`: Triton kernels; their CPU cases
run only where the kernels were decorated by Triton's interpreter (TRITON_INTERPRET=1 before triton was
imported: `conftest.py` sets it when there is no GPU) and skip otherwise, e.g. on a GPU machine, or under
`TRITON_INTERPRET=0` here.
"""

import os
import subprocess
import sys

import pytest
import torch
from fastpred.kernels._launch import interpreted

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = interpreted()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED,
    reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1 (conftest.py sets it where there is no GPU)",
)

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
TRITON_DEVICES = [pytest.param("cpu", marks=needs_interpreter)] + (["cuda"] if HAS_CUDA else [])


def run_without_interpreter(code: str) -> str:
    """Run Python `code` in a fresh process with TRITON_INTERPRET unset and no GPU visible; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
