"""Device, size grids and the one timing routine every suite uses.

The grid depends on the device: the full grid of the issue on a GPU (or with FASTPRED_BENCH_FULL=1), a cut
grid on the CPU so that `pytest bench/` stays under 10 minutes on 2 cores.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import math
import os
import platform
import time
from collections.abc import Callable

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = DEVICE.type == "cuda" or os.environ.get("FASTPRED_BENCH_FULL") == "1"

# N = 8192 is not in the grid but is where the GPU goal (d = 256) is stated.
D_GRID = [64, 128, 256, 512, 1024, 2048, 4096] if FULL else [64, 128, 256, 512]
N_GRID = [256, 1024, 4096, 8192, 16384] if FULL else [256, 1024]
# Grouped predictor blocks (B, n): n = 32 is where torch routes a batch to cuSOLVER's syevjBatched.
BATCHED = [(8, 32), (64, 32), (4, 64), (16, 64), (8, 128)] if FULL else [(8, 32), (4, 64), (8, 128)]

RHO, EPS, ALPHA = 0.3, 0.1, 0.5  # the paper's best setting on STL-10
STREAM_RHOS = [0.3, 0.99]  # fast and slow EMA: how far F moves between steps decides warm-start cost

# Timing: enough rounds for a stable median within a per-test time budget.
TARGET_S = 0.3 if DEVICE.type == "cuda" else 1.0  # the full GPU grid must fit in 10 minutes
MIN_ROUNDS = 5 if DEVICE.type == "cuda" else 3
MAX_ROUNDS = 1000 if DEVICE.type == "cuda" else 50
WARMUP = 3 if DEVICE.type == "cuda" else 1  # Triton compiles and cuSOLVER allocates workspaces on the first calls


def official_budget_bytes() -> int:
    """Largest (N, d, d) fp32 tensor of outer products the official formulation may materialise."""
    if "FASTPRED_BENCH_OFFICIAL_MAX_GB" in os.environ:
        return int(float(os.environ["FASTPRED_BENCH_OFFICIAL_MAX_GB"]) * 2**30)
    if DEVICE.type == "cuda":
        return min(8 * 2**30, int(0.4 * torch.cuda.get_device_properties(DEVICE).total_memory))
    return 2**29  # on 2 CPU cores time, not memory, is the limit: 512 MiB of outer products is ~1 s


def skip_official_if_too_big(n: int, d: int) -> None:
    need = n * d * d * 4
    if need > official_budget_bytes():
        pytest.skip(f"official formulation would materialise {need / 2**30:.1f} GiB of outer products")


def needs_triton() -> None:
    """Skip unless the Triton kernels can run for real (never under the numpy interpreter)."""
    if DEVICE.type != "cuda":
        pytest.skip("Triton kernels need CUDA (the interpreter is an emulator, not a benchmark)")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: Triton kernels would run in the numpy emulator")


def kernel(name: str) -> Callable:
    """A public function of fastpred.kernels; skips the test when the package or the function is missing."""
    try:
        module = importlib.import_module("fastpred.kernels")
    except ImportError as exc:
        pytest.skip(f"fastpred.kernels not importable: {exc}")
    if not hasattr(module, name):
        pytest.skip(f"fastpred.kernels has no {name}")
    return getattr(module, name)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@functools.cache
def versions() -> dict[str, str]:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "absent"
    return {"torch": torch.__version__, "triton": triton}


@functools.cache
def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_memory(fn: Callable[[], object]) -> int:
    """Bytes allocated beyond what was already resident, at the high point of one call of fn."""
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        fn()
        sync()
        return torch.cuda.max_memory_allocated(DEVICE) - base
    # The CPU allocator keeps no statistics; the profiler logs every allocation and free in order.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # a private profiler API: report "unknown" (-1) rather than fail the benchmark
        return -1
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def measure(
    benchmark,
    fn: Callable[[], object],
    *,
    ceiling: dict[str, float],
    flops: float,
    bytes_moved: float,
    provider: str,
    baseline: str,
    case: str,
    **info: object,
) -> None:
    """Time fn (synchronised inside the timed callable) and record what the report needs in extra_info.

    flops and bytes_moved are the nominal work of the operation, the same for every provider of a case,
    so FLOP/s and GB/s compare useful work, not what a formulation happens to waste.
    """

    def timed() -> None:
        fn()
        sync()

    for _ in range(WARMUP):  # compilation and first-call allocations are not timed
        timed()
    start = time.perf_counter()
    timed()
    once = time.perf_counter() - start
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TARGET_S / max(once, 1e-9))))
    peak = peak_memory(timed)
    benchmark.extra_info.update(
        provider=provider,
        baseline=baseline,
        case=case,
        device=device_name(),
        torch_threads=torch.get_num_threads(),
        **versions(),
        flops=flops,
        bytes=bytes_moved,
        peak_mem_bytes=peak,
        flops_ceiling=ceiling["flops"],
        bytes_ceiling=ceiling["bytes"],
        **info,
    )
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark.stats, "stats", None) if not benchmark.disabled else None
    if stats is not None and stats.median > 0:
        rate, bandwidth = flops / stats.median, bytes_moved / stats.median
        benchmark.extra_info.update(
            flops_per_s=rate,
            flops_frac=rate / ceiling["flops"],
            bytes_per_s=bandwidth,
            bytes_frac=bandwidth / ceiling["bytes"],
        )
