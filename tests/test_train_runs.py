"""Short real runs of the trainer: every predictor and method, exact resume after SIGTERM, same seed -> same run
on the digits, a 2-process torchrun (gloo) run, plots and torchvision loading of real runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastpred.train.__main__ import main

pytest.importorskip("ffcv", reason="the trainer's data path needs fastpred[data]")

TINY = ["--proj-dim", "8", "--proj-hidden", "16", "--batch-size", "8", "--resolution", "8", "--log-every", "1",
        "--progress", "plain", "--spectrum-every", "2"]


def _losses(run) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One digits .beton cache for the module (the trainer writes it on first use)."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("method", ["byol", "simsiam"])
@pytest.mark.parametrize("predictor", ["directpred", "directcopy", "linear", "mlp", "offdiag", "none"])
def test_every_predictor_and_method_trains(tmp_path, method, predictor):
    run = tmp_path / "run"
    argv = [*TINY, "--data", "synthetic", "--synthetic-steps", "3", "--epochs", "2", "--method", method,
            "--predictor", predictor, "--out", str(run)]
    if predictor == "mlp":
        argv += ["--pred-hidden", "16"]
    assert main(argv) == 0
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 7)) and all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and state["epoch"] == 2 and ("target_backbone" in state) == (method == "byol")
    if predictor in ("directpred", "directcopy"):
        assert int(state["predictor"]["num_folds"]) == 6 and state["predictor"]["F"].abs().sum() > 0
    assert (run / "spectrum.npz").exists()


def test_trainable_directpred_with_freq(tmp_path):
    run = tmp_path / "run"
    argv = [*TINY, "--data", "synthetic", "--synthetic-steps", "4", "--epochs", "1", "--freq", "2", "--trainable",
            "--out", str(run)]
    assert main(argv) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert int(state["predictor"]["num_folds"]) == 4
    # W is a parameter the optimizer trains between refreshes: it has a momentum buffer of W's shape.
    buffers = [v["momentum_buffer"].shape for v in state["optimizer"]["state"].values()]
    assert torch.Size([1, 8, 8]) in buffers


def _train_cmd(*argv):
    return [sys.executable, "-m", "fastpred.train", *argv]


def test_sigterm_then_resume_reproduces_every_step(tmp_path):
    """Bitwise on one thread. With several, a new process's first steps may round a float reduction differently
    (seen: relative 5e-7 on the first resumed step), so the exact comparison pins one thread."""
    argv = [*TINY, "--data", "synthetic", "--synthetic-steps", "40", "--epochs", "3", "--seed", "7"]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(*argv, "--out", str(whole)), check=True, capture_output=True, timeout=600, env=env)
    proc = subprocess.Popen(_train_cmd(*argv, "--out", str(parted)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = parted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 50):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "checkpoint written" in err
    stopped_at = torch.load(parted / "checkpoint.pt", weights_only=True)
    assert 50 <= stopped_at["step"] < 120 and stopped_at["batch_in_epoch"] == stopped_at["step"] % 40
    resumed = subprocess.run(_train_cmd("--resume", str(parted)), capture_output=True, text=True, timeout=600,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _losses(whole), _losses(parted)
    assert sorted(a) == sorted(b) == list(range(1, 121))
    assert a == b  # bitwise: the same floats at every step


def test_same_seed_same_run_on_digits(tmp_path, cache, monkeypatch):
    """Bitwise with one FFCV worker, which also makes torch use one thread: FFCV sets torch's thread count to its
    worker count, and with two threads float reductions were seen to round differently (1e-7 relative). That
    the crops themselves do not depend on the worker count is tested with the loader (test_data_loader.py)."""
    monkeypatch.setenv("FASTPRED_CACHE", cache)
    threads = torch.get_num_threads()
    common = ["--proj-dim", "16", "--batch-size", "64", "--max-steps", "6", "--log-every", "1", "--knn-every", "0",
              "--final-probe", "false", "--progress", "plain", "--workers", "1"]
    try:
        for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
            assert main([*common, "--seed", seed, "--out", str(tmp_path / name)]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b, c = (_losses(tmp_path / n) for n in "abc")
    assert len(a) == 6 and a == b
    assert a != c


def test_torchrun_two_processes_gloo(tmp_path, cache):
    run = tmp_path / "run"
    env = {**os.environ, "FASTPRED_CACHE": cache, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastpred.train", "--proj-dim", "16", "--batch-size", "128", "--epochs", "1", "--log-every", "2",
           "--final-probe", "false", "--progress", "plain", "--out", str(run)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 1437 digits sharded over 2 ranks at 128 per rank: 5 steps per epoch, logged once (rank 0 writes).
    assert [r["step"] for r in lines if r["kind"] == "train"] == [2, 4, 5]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert len(evals) == 1 and 0.1 < evals[0]["knn_acc"] <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images_per_sec"] > 0 and summary["knn_acc"] > 0.1
    assert done.stdout.count("run folder") == 1  # only rank 0 speaks


def test_plot_renders_every_figure_from_real_runs(tmp_path):
    """python -m fastpred.plot on two short trainer runs (DirectPred and a linear head): every figure, non-empty."""
    from fastpred.plot import main as plot_main

    runs = []
    for predictor in ("directpred", "linear"):
        run = tmp_path / predictor
        argv = [*TINY, "--data", "synthetic", "--synthetic-steps", "3", "--epochs", "2", "--predictor", predictor,
                "--spectrum-every", "1", "--out", str(run)]
        assert main(argv) == 0
        runs.append(str(run))
    out = tmp_path / "figures"
    assert plot_main([*runs, "--out", str(out)]) == 0
    expected = {f"{n}-{kind}.png" for n in ("directpred", "linear") for kind in ("overview", "spectrum")}
    expected |= {"compare-overview.png", "compare-spectrum.png"}
    written = {p.name: p.stat().st_size for p in out.iterdir()}
    assert expected <= set(written) and all(written[name] > 10_000 for name in expected)


def test_checkpoint_backbone_loads_into_torchvision(tmp_path):
    """The documented recipe: a resnet18_small run's backbone loads into torchvision's resnet18 with fc = Identity
    and the small-image stem, and computes the same features."""
    import torchvision
    from torch import nn

    run = tmp_path / "run"
    argv = [*TINY, "--data", "synthetic", "--synthetic-steps", "2", "--epochs", "1", "--backbone", "resnet18_small",
            "--batch-size", "4", "--out", str(run)]
    assert main(argv) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.load_state_dict(state["backbone"])  # strict: every key, no prefix
    from fastpred.core.models import build_backbone

    ours = build_backbone("resnet18_small")[0]
    ours.load_state_dict(state["backbone"])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), ours.eval()(x), rtol=0, atol=0)


def test_a_trainer_start_validates_each_file_once(tmp_path, cache, monkeypatch):
    """The held-out split, the class count, the training views and the probes' labels all need a checked .beton;
    each file is validated (opened, its header and tables read) once per process, whatever the split."""
    from fastpred.data import loader
    from fastpred.data.named import named_betons
    from fastpred.train import config as train_config
    from fastpred.train.loop import Trainer
    from fastpred.train.run_dir import RunDir

    monkeypatch.setenv("FASTPRED_CACHE", cache)
    train, test = (str(p) for p in named_betons("digits"))
    validate, validated = loader._validate_beton, []

    def counted(path, fields):
        validated.append(path)
        return validate(path, fields)

    monkeypatch.setattr(loader, "_validate_beton", counted)
    threads = torch.get_num_threads()
    try:
        for given, files in (({"data": "digits"}, [train, test]), ({"data": train}, [train]),
                             ({"data": train, "val": test}, [train, test])):
            monkeypatch.setattr(loader, "_VALIDATED", {})  # as in a new process
            validated.clear()
            cfg = train_config.resolve({**given, "workers": 1})
            trainer = Trainer(cfg, RunDir(tmp_path / "run", writer=False), rank=0, world_size=1,
                              device=torch.device("cpu"))
            assert sorted(validated) == sorted(files), given
            assert trainer.probe.head.out_features == 10  # the class count, from the probes' labels
    finally:
        torch.set_num_threads(threads)


class _SlowViews:
    """The run's training views, each batch arriving DELAY_S later: a loader slower than the step."""

    DELAY_S = 0.05

    def __init__(self, views):
        self.views = views

    def __len__(self):
        return len(self.views)

    def set_epoch(self, epoch, skip_batches=0):
        self.views.set_epoch(epoch, skip_batches)

    def __iter__(self):
        for batch in self.views:
            time.sleep(self.DELAY_S)
            yield batch


def test_data_wait_share_counts_the_wait_for_each_batch(tmp_path, cache, monkeypatch, capsys):
    from fastpred.train import data as train_data

    monkeypatch.setenv("FASTPRED_CACHE", cache)
    build = train_data.Sources.__init__

    def slow_sources(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.train_views = _SlowViews(self.train_views)

    monkeypatch.setattr(train_data.Sources, "__init__", slow_sources)
    run = tmp_path / "run"
    assert main(["--proj-dim", "16", "--batch-size", "64", "--max-steps", "6", "--log-every", "2", "--knn-every", "0",
                 "--final-probe", "false", "--progress", "plain", "--out", str(run)]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    last_step, last_time = 0, 0.0
    for r in train:
        assert 0 <= r["data_wait_share"] <= 1
        # The interval waited at least its steps' delays: share x the interval's wall time covers them.
        waited = r["data_wait_share"] * (r["time_s"] - last_time)
        assert waited >= (r["step"] - last_step) * _SlowViews.DELAY_S * 0.999, r
        last_step, last_time = r["step"], r["time_s"]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(printed) == 3 and all(" data " in line and "%" in line for line in printed)
