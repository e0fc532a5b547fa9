"""Processes under torchrun: one per GPU (NCCL) or per CPU worker (gloo); single-process runs skip all of it."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

#: Minutes a collective may wait for the slowest rank (`--dist-timeout`). Work is spread over the ranks, so what
#: one rank does while the others wait is short: rank 0 writing a checkpoint (a ResNet-50 run's is ~0.5 GB), a
#: first `torch.compile` that takes longer on one rank. 30 minutes covers slow storage and compilation with margin
#: (NCCL's own default is 10) and still ends a job whose rank has died within half an hour.
DEFAULT_TIMEOUT_MIN = 30.0


def setup(device_flag: str, timeout_min: float = DEFAULT_TIMEOUT_MIN) -> tuple[int, int, torch.device]:
    """(rank, world size, device) for `--device auto|cpu|cuda`; initialises the process group under torchrun,
    with collectives that give up after `timeout_min` minutes."""
    if not timeout_min > 0:
        raise ValueError(f"--dist-timeout must be > 0 minutes, got {timeout_min}")
    want_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if want_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
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


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """x reduced over all processes in place (`op`: sum or max) and returned; x itself in one process."""
    if active() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's x (n_r, ...) concatenated along dim 0 in rank order, on every process; n_r may differ.

    Rows are padded to the largest n_r for the collective (gloo and NCCL gather equal shapes), then cut back."""
    if not active() or dist.get_world_size() == 1:
        return x
    sizes = torch.tensor([len(x)], device=x.device)
    gathered_sizes = [torch.empty_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered_sizes, sizes)
    counts = [int(n) for n in gathered_sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def teardown() -> None:
    if active():
        dist.destroy_process_group()
