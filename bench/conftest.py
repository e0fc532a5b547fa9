"""Session set-up for `pytest bench/`: import path, fp32 precision, measured ceilings, machine info in the JSON.

The machine-info hooks serve every suite in bench/, the data-loader benchmarks included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

# --import-mode=importlib (pyproject) puts nothing on sys.path; the suites import their helpers as `bench.*`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402
from bench.ceiling import measure_ceiling  # noqa: E402

_START = time.time()
_LOAD_START = list(os.getloadavg())


@pytest.fixture(autouse=True)
def pinned_threads():
    """FASTPRED_BENCH_THREADS pins torch's intra-op threads for every benchmark. On a shared machine 2 OpenMP
    threads on 2 busy cores wait a scheduler slice at every barrier; one thread measures the code, not the
    neighbours. Re-applied per test because FFCV's loader resets torch's thread count."""
    if os.environ.get("FASTPRED_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FASTPRED_BENCH_THREADS"]))
    yield


@pytest.fixture(scope="session")
def ieee_fp32():
    """fp32 matmuls in true IEEE fp32 for every provider, as the contract requires: TF32 would flatter the
    baselines with an accuracy they are not allowed. Requested by the predictor suites only."""
    from fastpred.numerics import full_fp32_matmul

    with full_fp32_matmul():
        yield


@pytest.fixture(scope="session")
def ceiling() -> dict[str, float]:
    return measure_ceiling()


def _git(*args: str) -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(
        bench_device=harness.device_name(),
        bench_device_type=harness.DEVICE.type,
        **harness.versions(),
        cpu_count=os.cpu_count(),
        torch_threads=os.environ.get("FASTPRED_BENCH_THREADS") or torch.get_num_threads(),
        full_grid=harness.FULL,
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0"),
        commit_short=_git("rev-parse", "--short", "HEAD"),
        worktree_dirty=bool(_git("status", "--porcelain")),
        loadavg_start=_LOAD_START,
    )


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Load at the end, next to the load at the start: the only trace of what else shared the machine.
    output_json["machine_info"]["loadavg_end"] = list(os.getloadavg())
    output_json["machine_info"]["session_wall_s"] = round(time.time() - _START, 1)
