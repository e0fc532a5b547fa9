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
