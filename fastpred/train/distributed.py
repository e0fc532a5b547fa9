"""Processes under torchrun: one per GPU (NCCL) or per CPU worker (gloo); single-process runs skip all of it."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device_flag: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) for `--device auto|cpu|cuda`; initialises the process group under torchrun."""
    want_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if want_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if want_cuda else "gloo")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_mean(grad: torch.Tensor) -> torch.Tensor:
    """A gradient hook: the mean of this gradient over all processes."""
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def teardown() -> None:
    if active():
        dist.destroy_process_group()
