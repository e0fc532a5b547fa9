"""The predictor's own optimizer settings (--pred-lr, --pred-wd, --pred-lr-fixed) and the official code's symmetric
linear head (--pred-reg symmetric), in one process and under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastpred.train.__main__ import main
from fastpred.train.optim import group_lr, lr_at, with_predictor_group

TINY = ["--data", "synthetic", "--proj-dim", "8", "--proj-hidden", "16", "--batch-size", "8", "--resolution", "8",
        "--log-every", "1", "--progress", "plain", "--spectrum-every", "0"]


def _train_records(run) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "train"]


def test_group_lr_scales_or_fixes_the_predictor_only():
    encoder, predictor = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False)
    groups = with_predictor_group([encoder], predictor, weight_decay=1e-4, exclude_bias_and_norm=False, base_lr=0.1,
                                  pred_base_lr=1.0, pred_weight_decay=0.0, pred_lr_fixed=False)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0] and groups[1]["params"] == [predictor.weight]
    for step in (0, 5, 9):
        lr = lr_at(step, total_steps=10, warmup_steps=2, base_lr=0.1, schedule="cosine")
        assert group_lr(groups[0], lr) == lr
        assert group_lr(groups[1], lr) == pytest.approx(10 * lr)  # 1.0 / 0.1 times the encoder's, scheduled alike
        assert group_lr({**groups[1], "fixed_lr": True}, lr) == 1.0  # SimSiam: constant


def test_predictor_lr_fixed_while_encoder_decays_and_its_own_weight_decay(tmp_path):
    run = tmp_path / "run"
    argv = [*TINY, "--synthetic-steps", "4", "--epochs", "1", "--predictor", "linear", "--schedule", "cosine",
            "--lr", "0.05", "--pred-lr", "0.2", "--pred-wd", "0", "--pred-lr-fixed", "--out", str(run)]
    assert main(argv) == 0
    records = _train_records(run)
    assert [r["pred_lr"] for r in records] == [0.2] * 4
    lrs = [r["lr"] for r in records]
    assert lrs[0] == 0.05 and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))  # cosine decay
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g.get("predictor", False) for g in groups] == [False, True]
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 4e-4


def test_default_keeps_one_group_and_no_pred_lr(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--synthetic-steps", "2", "--epochs", "1", "--predictor", "linear", "--out", str(run)]) == 0
    assert all(r["pred_lr"] is None for r in _train_records(run))
    assert len(torch.load(run / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]) == 1


@pytest.mark.parametrize("reg", ["symmetric", "none"])
def test_symmetric_linear_head(tmp_path, reg):
    run = tmp_path / "run"
    assert main([*TINY, "--synthetic-steps", "3", "--epochs", "1", "--predictor", "linear", "--pred-reg", reg,
                 "--out", str(run)]) == 0
    W = torch.load(run / "checkpoint.pt", weights_only=True)["predictor"]["linear.weight"]
    assert torch.equal(W, W.T) == (reg == "symmetric")  # a trained linear head is not symmetric by itself


def test_trainable_directpred_takes_a_predictor_group(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--synthetic-steps", "2", "--epochs", "1", "--trainable", "--freq", "2", "--pred-lr", "0.5",
                 "--out", str(run)]) == 0
    assert [r["pred_lr"] for r in _train_records(run)] == [0.5, 0.5]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--predictor", "none", "--pred-lr", "0.1"], "--pred-lr applies only with a trained predictor"),
        (["--predictor", "directpred", "--pred-wd", "0"], "--pred-wd applies only with a trained predictor"),
        (["--predictor", "directcopy", "--pred-lr-fixed"], "--pred-lr-fixed applies only with a trained predictor"),
        (["--predictor", "mlp", "--pred-reg", "symmetric"], "--pred-reg applies only with --predictor linear"),
        (["--predictor", "offdiag", "--pred-reg", "symmetric"], "--pred-reg applies only with --predictor linear"),
        (["--predictor", "linear", "--pred-lr", "0"], "--pred-lr must be > 0"),
        (["--predictor", "linear", "--pred-wd", "-1"], "--pred-wd must be >= 0"),
    ],
)
def test_flags_that_do_not_apply(tmp_path, capsys, argv, says):
    out = tmp_path / "run"
    assert main([*TINY, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]
    assert not out.exists()


def test_symmetric_head_under_torchrun(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastpred.train", *TINY, "--synthetic-steps", "3", "--epochs", "1", "--predictor", "linear",
           "--pred-reg", "symmetric", "--pred-lr", "0.1", "--out", str(run)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    W = torch.load(run / "checkpoint.pt", weights_only=True)["predictor"]["linear.weight"]
    assert torch.equal(W, W.T) and [r["pred_lr"] for r in _train_records(run)] == [0.1] * 3
