"""The ablation's command line and table, and the raw-pixel baselines, on the embedded digits (no training run)."""

import json

from fastpred.train import ablation, pixel_baselines


def test_rows_per_data_set(capsys):
    assert ablation.main(["--data", "fashion-mnist", "--list"]) == 0
    listed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    filters = ["byol-directpred-log", "byol-directpred-log1p", "byol-directpred-log1p-sq"]
    iso = ["byol-directpred-iso", "byol-directpred-iso-noema"]
    assert listed == [*ablation.PAPER, *filters, *iso]
    assert ablation.main(["--list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(ablation.rows()) - len(filters) - len(iso) == 20
    assert ablation.rows()["byol-directpred-iso-noema"][-4:] == ["--loss", "iso", "--target-ema", "0"]
    assert ablation.rows()["byol-directpred-log1p-sq"][-2:] == ["--filter", "log1p_sq"]
    assert ablation.preset_for("fashion-mnist") == "fashion-mnist" and ablation.preset_for("digits") == "digits"


def test_bad_rows_and_epochs_are_one_line(capsys):
    assert ablation.main(["--only", "byol-nothing"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown row(s) byol-nothing")
    assert ablation.main(["--epochs", "0", "--only", "byol-mlp"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_table_cells_and_baseline_rows():
    results = {"byol-directpred": [{"linear_probe_acc": 0.9, "knn_acc": 0.8}, {"linear_probe_acc": 0.8}]}
    baselines = {"knn": {"accuracy": 0.855, "seconds": 69.2, "settings": "kNN (k=5)"}}
    text = ablation.table(results, baselines)
    assert "| byol-directpred | 0.850 (0.800-0.900) | 0.800 |" in text
    assert "| raw pixels: kNN (k=5) | 0.855 |" in text and text.rstrip().endswith("| 69 |")


def test_pixel_baselines_on_the_digits_are_cached(tmp_path):
    cache = tmp_path / "pixels.json"
    first = pixel_baselines.measure("digits", ["knn"], cache=cache)["knn"]
    assert 0.9 < first["accuracy"] <= 1.0 and first["train_images"] == 1437
    stored = json.loads(cache.read_text())
    stored["knn"]["accuracy"] = -1.0  # a cached result is reused, not recomputed
    cache.write_text(json.dumps(stored))
    assert pixel_baselines.measure("digits", ["knn"], cache=cache)["knn"]["accuracy"] == -1.0


def _finished_row(folder, args):
    """A row's folder as a finished run of `args` leaves it (the trainer's config, a checkpoint, a summary)."""
    from fastpred.train import config as train_config

    cfg = train_config.resolve(vars(train_config.build_parser().parse_args(args)))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(train_config.to_json(cfg))
    (folder / "checkpoint.pt").write_bytes(b"")
    (folder / "summary.json").write_text(json.dumps({"epochs": cfg.epochs, "steps": 7, "linear_probe_acc": 0.5}))


def test_finished_rows_are_read_and_another_runs_folder_is_refused(tmp_path, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr(ablation.subprocess, "run", no_training)
    folder = tmp_path / "byol-mlp-s0"
    _finished_row(folder, ablation.row_args(ablation.rows()["byol-mlp"], 0, folder, extra=["--epochs", "1"]))
    assert ablation.main(["--only", "byol-mlp", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert "| byol-mlp | 0.500 |" in capsys.readouterr().out
    # The same folder asked for with another backbone (as after a preset's change): refused, not read as the row.
    assert ablation.main(["--only", "byol-mlp", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path),
                          "--backbone", "small_cnn_512"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "backbone is 'small_cnn' there, 'small_cnn_512' here" in err
    assert len(err.strip().splitlines()) == 1
