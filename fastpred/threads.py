"""CPU threads per process: FFCV's decoding threads and torch's own, each process taking its share of the cores.

Used by the loaders (`fastpred.data.loader`, for `num_workers=-1`) and the trainer; imports nothing but the
standard library.

Under torchrun every process on a node would otherwise take every core twice over: FFCV's `num_workers=-1` means
`multiprocessing.cpu_count()` (which ignores CPU affinity and container quotas), and FFCV sets torch's thread
count to its worker count as a side effect. Eight processes on one node then run 8x more threads than cores; on a
busy 2-core machine decoding was measured 8x slower under such contention. Here the cores a process may use are
counted (affinity, then the cgroup CPU quota), divided by the processes on the node (torchrun's LOCAL_WORLD_SIZE),
and both thread counts are set on purpose: the loaders put torch's back after FFCV touches it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers, SLURM)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota(cgroup)
    return max(1, min(cores, quota) if quota else cores)


def cgroup_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup v2 (`cpu.max`) or v1 (`cpu/cpu.cfs_quota_us` over `cpu.cfs_period_us`) CPU quota, rounded up to
    whole cores; None where there is none."""
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else math.ceil(int(limit) / int(period))
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return math.ceil(quota / period) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def local_processes() -> int:
    """Processes of this job on this node (torchrun sets LOCAL_WORLD_SIZE); 1 outside torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass(frozen=True)
class ThreadPlan:
    cores: int  # usable cores on this node, as this process sees them
    processes: int  # processes sharing them
    workers: int  # FFCV decoding threads of this process
    torch_threads: int  # torch's intra-op threads of this process

    def describe(self) -> str:
        return (f"threads per process: {self.workers} FFCV decoding, {self.torch_threads} torch "
                f"({self.cores} usable cores / {self.processes} process(es) on this node)")


def plan(workers: int, torch_threads: int) -> ThreadPlan:
    """Resolve `--workers` and `--threads` (-1: this process's share of the usable cores, at least 1)."""
    cores, processes = usable_cores(), local_processes()
    share = max(1, cores // processes)
    return ThreadPlan(cores, processes, share if workers < 1 else workers,
                      share if torch_threads < 1 else torch_threads)
