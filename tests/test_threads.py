"""CPU threads per process: each process's share of the cores it may use, and torch's count set on purpose."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastpred import threads


def test_share_divides_usable_cores_by_local_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(threads, "cgroup_quota", lambda cgroup: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    plan = threads.plan(-1, -1)
    assert (plan.cores, plan.processes, plan.workers, plan.torch_threads) == (16, 8, 2, 2)
    assert "2 FFCV decoding, 2 torch (16 usable cores / 8 process(es) on this node)" in plan.describe()
    assert threads.plan(3, 5).workers == 3 and threads.plan(3, 5).torch_threads == 5  # explicit counts win
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more processes than cores: still one thread each
    assert threads.plan(-1, -1).workers == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert threads.plan(-1, -1).workers == 16


def test_affinity_and_container_quota_are_respected(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # 2.5 cores of quota: 3 threads
    assert threads.cgroup_quota(tmp_path) == 3 and threads.usable_cores(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None and threads.usable_cores(tmp_path) == 6
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads.usable_cores(v1) == 4
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")  # no limit
    assert threads.usable_cores(v1) == 6


def test_loaders_leave_torch_threads_alone(tmp_path):
    pytest.importorskip("ffcv", reason="needs fastpred[data]")
    from fastpred.data.loader import EvalLoader, TwoViewLoader
    from fastpred.data.sources import ArraySource
    from fastpred.data.write import write_beton

    path = tmp_path / "tiny.beton"
    rng = np.random.default_rng(0)
    write_beton(ArraySource(rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8), np.arange(12) % 3, "t"), path,
                workers=1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for loader in (TwoViewLoader(path, 4, 8, num_workers=2, seed=0), EvalLoader(path, 4, 8, num_workers=2)):
            assert torch.get_num_threads() == 1  # FFCV set it to 2 while building the loader
            for _ in range(2):  # and again at the start of every epoch
                assert sum(len(batch[0]) for batch in loader) > 0
                assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_trainer_prints_and_uses_its_share(tmp_path):
    pytest.importorskip("ffcv", reason="needs fastpred[data]")
    # A process that torchrun would have started as one of two on this node (LOCAL_WORLD_SIZE=2), alone here.
    env = {**os.environ, "LOCAL_WORLD_SIZE": "2", "FASTPRED_CACHE": str(tmp_path / "cache")}
    code = ("import sys, torch; from fastpred.train.__main__ import main; rc = main(sys.argv[1:]); "
            "print('torch threads', torch.get_num_threads()); sys.exit(rc)")
    args = ["--data", "synthetic", "--preset", "cifar10", "--backbone", "small_cnn", "--proj-dim", "8",
            "--proj-hidden", "16", "--batch-size", "4", "--resolution", "8", "--synthetic-steps", "1", "--epochs", "1",
            "--progress", "plain", "--threads", "-1", "--out", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    share = max(1, threads.usable_cores() // 2)
    assert f"{share} torch ({threads.usable_cores()} usable cores / 2 process(es) on this node)" in done.stdout
    assert f"torch threads {share}" in done.stdout
