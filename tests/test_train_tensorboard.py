"""--tensorboard: event files in the run folder, read back with TensorBoard's own reader."""

import json

import pytest

from fastpred.train.__main__ import main

pytest.importorskip("tensorboard", reason="--tensorboard needs fastpred[tensorboard]")

TINY = ["--proj-dim", "8", "--proj-hidden", "16", "--batch-size", "32", "--resolution", "8", "--log-every", "2",
        "--progress", "plain", "--spectrum-every", "3", "--final-probe-epochs", "5", "--workers", "1"]


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    histograms = {tag: [e.step for e in acc.Histograms(tag)] for tag in acc.Tags()["histograms"]}
    return scalars, histograms


def test_event_file_holds_the_metrics_and_spectra(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPRED_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--max-steps", "9", "--predictor", "linear", "--pred-lr", "0.1",
                 "--tensorboard", "--out", str(run)]) == 0
    scalars, histograms = _events(run / "tensorboard")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    # The same numbers as metrics.jsonl, at the same steps.
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in train]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    for tag in ("train/lr", "train/pred_lr", "eval/online_probe_acc", "health/output_std",
                "health/effective_rank", "speed/images_per_sec", "eval/knn_acc", "eval/linear_probe_acc",
                "eval/linear_probe_acc_random_init"):
        assert scalars.get(tag), tag
    summary = json.loads((run / "summary.json").read_text())
    assert scalars["eval/linear_probe_acc"] == [(9, pytest.approx(summary["linear_probe_acc"], rel=1e-6))]
    assert histograms["spectrum/F_eigenvalues"] == [0, 3, 6]  # every spectrum record


def test_resume_purges_events_past_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    base = [*TINY[:-2], "--data", "synthetic", "--synthetic-steps", "5", "--epochs", "2", "--tensorboard"]
    assert main([*base, "--max-steps", "7", "--keep-every", "1", "--out", str(run)]) == 0
    # A crash after step 7 was logged but before its checkpoint: the run's last checkpoint is epoch 1's (step 5).
    (run / "checkpoint-epoch0001.pt").replace(run / "checkpoint.pt")
    assert main(["--resume", str(run), "--max-steps", "0"]) == 0
    scalars, _ = _events(run / "tensorboard")
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == [2, 4, 5, 6, 8, 10]  # 6 and 7 of the first run purged, each step once, to the end
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in lines if r["kind"] == "train"])


def test_without_the_package_one_error_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    assert main([*TINY[:-2], "--data", "synthetic", "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --tensorboard needs the tensorboard package: pip install 'fastpred[tensorboard]'"]
    assert not out.exists()
