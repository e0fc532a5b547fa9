"""Test set-up shared by every test module.

Without a GPU, Triton kernels run on the CPU through Triton's interpreter; the variable must be set
before Triton is first imported, which is why it is set here, at collection time.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Helpers shared by test modules (e.g. `contract`) are imported by name; pytest's importlib mode
# does not put this folder on sys.path by itself.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def one_torch_thread():
    """Many tiny ops: on shared cores OpenMP's hand-offs cost more than the arithmetic (the digits probe takes ~1 s
    on one thread and ~9 s on two busy ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
