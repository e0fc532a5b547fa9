"""The devices tests run on: the CPU always, CUDA when present (GPU-only cases skip without it)."""

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
