"""Test set-up shared by every test module.

Without a GPU, Triton kernels run on the CPU through Triton's interpreter; the variable must be set
before Triton is first imported, which is why it is set here, at collection time.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Helpers shared by test modules (e.g. `contract`) are imported by name; pytest's importlib mode
# does not put this folder on sys.path by itself.
sys.path.insert(0, os.path.dirname(__file__))
