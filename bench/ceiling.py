"""The measured ceilings every benchmark is reported against, taken once per session on the bench device.

FLOP/s: a large square fp32 matmul in true IEEE fp32 (the contract forbids TF32 for the statistics, so TF32
tensor-core peaks would be the wrong yardstick). GB/s: a large device-to-device copy (read + write).
Both are the best of many repetitions, as a ceiling should be.
"""

from __future__ import annotations

import time

import torch

from bench.harness import DEVICE, sync
from fastpred.numerics import full_fp32_matmul


def _best_seconds(fn, repeats: int) -> float:
    fn()  # first call: cuBLAS heuristics, page faults
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_flops(n: int) -> float:
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    c = torch.empty(n, n, device=DEVICE)
    with full_fp32_matmul():
        return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b, out=c), repeats=10)


def _copy_bytes_per_s(numel: int) -> float:
    src = torch.rand(numel, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * numel * 4 / _best_seconds(lambda: dst.copy_(src), repeats=10)  # read + write


def measure_ceiling() -> dict[str, float]:
    # Best of many short repetitions over two sizes: on a shared machine a long single run measures the
    # neighbours, not the hardware. Each size is far beyond the caches for the copy.
    gpu = DEVICE.type == "cuda"
    sizes = (4096, 8192) if gpu else (1024, 2048)
    numel = 2**28 if gpu else 2**25  # 1 GiB on a GPU, 128 MiB on the CPU
    return {
        "flops": max(_matmul_flops(n) for n in sizes),
        "bytes": _copy_bytes_per_s(numel),
        "matmul_n": max(sizes),
        "copy_bytes": numel * 4,
    }
