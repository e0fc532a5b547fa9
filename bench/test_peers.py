"""fastpred against byol-pytorch and lightly on a subset of Fashion-MNIST: one short run of each, start-up included
(`bench.peers` sets each up and documents the protocol; `python -m bench.peers` is the full comparison).

Each case launches one run in its own process (1,024 training images, one epoch of 4 steps of 256, 2 torch
threads) and times it whole; `extra_info` holds the images/s of the epoch's steps and of the run, and the linear
probe of the trained backbone (fitted on the subset's features, scored on 1,000 test images). A peer that is not
installed is skipped (`pip install -e '.[bench]'`); so is the file where Fashion-MNIST is not.
"""

from __future__ import annotations

import dataclasses

import pytest

from bench import peers

SUBSET = peers.Protocol(epochs=1, train_subset=1024, test_subset=1000, probe_epochs=10)


@pytest.fixture(scope="module")
def probe_data():
    if not (peers.FASHION_MNIST_DIR.is_dir() or __import__("os").environ.get("FASHION_MNIST_DIR")):
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    return peers.load_probe_data(SUBSET)


@pytest.mark.parametrize("system", peers.SYSTEMS)
def test_peer_run(benchmark, system, probe_data, tmp_path):
    why = peers.available(system)
    if why:
        pytest.skip(why)
    if system == "fastpred":
        pytest.importorskip("ffcv")
        peers._fastpred_betons(SUBSET, tmp_path)  # written once, before the timed run
    runs = iter(range(1000))

    def run() -> dict:  # a fresh folder per round: a finished run would be reused, not timed
        return peers.train_run(SUBSET, system, "docs", 0, tmp_path / f"round{next(runs)}", tmp_path)

    timing = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    summary = peers.summarise(timing)
    points = peers.probe_points(SUBSET, timing, tmp_path / "round0", probe_data)
    benchmark.extra_info.update(
        {**summary, "probe": points[-1]["probe"], "version": peers._version(system),
         "protocol": dataclasses.asdict(SUBSET)})
    assert len(points) == SUBSET.epochs and summary["steady_img_s"] > 0
    assert points[-1]["probe"] > 0.3  # ten classes: chance is 0.1, raw pixels give ~0.75


def test_equal_time_leads():
    """The probe comparison at equal wall-clock times: each run holds the probe of its last saved backbone."""

    def row(system, seed, points):
        return {"system": system, "aug": "docs", "seed": seed,
                "points": [{"wall_s": t, "probe": p} for t, p in points]}

    ahead = [row("fastpred", 0, [(40, 0.83), (80, 0.84)]), row("byol-pytorch", 0, [(39, 0.82), (76, 0.825)])]
    assert peers.equal_time_leads(ahead) == [
        "fastpred against byol-pytorch (docs), seed 0: ahead at every time both hold a backbone (smallest lead "
        "+0.005 at 76 s); only byol-pytorch holds one from 39 s to 40 s"]
    behind = [row("fastpred", 1, [(40, 0.83), (80, 0.84)]), row("lightly", 1, [(50, 0.80), (70, 0.85)])]
    assert peers.equal_time_leads(behind) == [
        "fastpred against lightly (docs), seed 1: not ahead at every time (smallest lead -0.020 at 70 s)"]
    assert peers.equal_time_leads([row("lightly", 2, [(50, 0.8)])]) == []  # no fastpred run of that seed
