"""The trainer's command line: every bad input gives one `error:` line, exit code 2, and touches nothing."""

import dataclasses
import json
import os

import pytest

from fastpred.train.__main__ import main

TINY = ["--data", "synthetic", "--proj-dim", "8", "--proj-hidden", "16", "--batch-size", "4", "--resolution", "8",
        "--synthetic-steps", "2", "--epochs", "1", "--log-every", "1", "--progress", "plain"]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--rho", "0.5", "--predictor", "mlp"], "--rho applies only with --predictor directpred"),
        (["--pred-hidden", "64"], "--pred-hidden applies only with --predictor mlp"),
        (["--method", "simsiam", "--target-ema", "0.99"], "--target-ema applies only with --method byol"),
        (["--val", "x.beton"], "--val applies only with --data PATH.beton"),
        (["--synthetic-steps", "3"], "--synthetic-steps applies only with --data synthetic"),
        (["--groups", "3"], "--groups 3 does not divide --proj-dim 64"),
        (["--batch-size", "1"], "--batch-size must be >= 2"),
        (["--rho", "1.0"], "--rho must be in [0, 1)"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--solver", "orth", "--predictor", "mlp"], "--solver applies only with --predictor directpred"),
        (["--solver", "orth", "--proj-dim", "128"], "--solver orth needs --proj-dim / --groups <= 64, got 128"),
        (["--cpu-amp", "true", "--amp", "false"], "--cpu-amp applies only with --amp true"),
    ],
)
def test_flags_that_do_not_apply_or_cannot_run(capsys, argv, says):
    assert says in _error(capsys, argv)


def test_unknown_preset_and_choices_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "mnist"])
    assert e.value.code == 2 and "invalid choice: 'mnist'" in capsys.readouterr().err


def test_missing_and_corrupt_beton(capsys, tmp_path):
    assert "no such file" in _error(capsys, ["--data", str(tmp_path / "none.beton"), "--out", str(tmp_path / "a")])
    bad = tmp_path / "bad.beton"
    bad.write_bytes(os.urandom(4096))
    assert "not a .beton file" in _error(capsys, ["--data", str(bad), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # a run that cannot start leaves nothing


def test_out_holding_a_run_is_never_overwritten(capsys, tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert "already holds a run" in _error(capsys, [*TINY, "--out", str(run)])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_errors(capsys, tmp_path):
    assert "no such folder" in _error(capsys, ["--resume", str(tmp_path / "nothing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no run to resume" in _error(capsys, ["--resume", str(empty)])
    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run)]) == 0
    capsys.readouterr()
    assert "contradicts the run's config" in _error(capsys, ["--resume", str(run), "--rho", "0.9"])
    assert "drop --out" in _error(capsys, ["--resume", str(run), "--out", str(tmp_path / "x")])
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in _error(capsys, ["--resume", str(run)])


def test_checkpoint_that_would_run_code_is_refused(capsys, tmp_path):
    import torch

    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run)]) == 0
    capsys.readouterr()

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"format": "fastpred-checkpoint-1", "x": Payload()}, run / "checkpoint.pt")
    assert "cannot read checkpoint" in _error(capsys, ["--resume", str(run)])
    assert not (tmp_path / "pwned").exists()


def test_run_folder_contents(capsys, tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == "synthetic" and config["proj_dim"] == 8 and config["alpha"] == 0.5
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] and env["device_type"] == "cpu" and env["world_size"] == 1
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["images_per_sec"] > 0 and summary["linear_probe_acc"] is None
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_help_lists_every_flag():
    # argparse %-formats help texts: a field comment with a literal "%" once made --help crash.
    from fastpred.train.config import Config, build_parser

    text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        assert f"--{f.name.replace('_', '-')}" in text
