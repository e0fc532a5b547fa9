"""`python -m fastpred.plot`: every figure for one and several runs, and what it does with incomplete folders."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastpred.plot.cli
from fastpred import DirectPredictor, LinearPredictor
from fastpred.plot import Run, load_run, main, overview_figure, spectrum_figure
from fastpred.plot.runs import make_unique
from fastpred.train.spectrum import SpectrumRecorder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, *, predictor="directpred", method="byol", steps=60, spectrum=True, summary=True, seed=0):
    """A plausible run folder from a short synthetic computation (not a trainer run).

    z drifts from isotropic towards a few strong directions, as projector outputs do in training; a
    DirectPredictor is set from it, a linear head is trained by SGD to map z to z (so it grows symmetric and
    aligned with F), an MLP head records F only. Metrics lines every 10 steps, an eval line every 20.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a thread pool's wake-ups on a busy machine cost more than the work
    try:
        return _write_run(folder, predictor, method, steps, spectrum, summary, seed)
    finally:
        torch.set_num_threads(threads)


def _write_run(folder, predictor, method, steps, spectrum, summary, seed):
    d, batch, steps_per_epoch = 16, 64, 20
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    speed = 1.0 + 0.3 * seed  # runs differ, so that overlaid curves are told apart
    strength = torch.linspace(3.0, 0.05, d)
    head = {"directpred": lambda: DirectPredictor(d, backend="torch"), "linear": lambda: LinearPredictor(d)}
    head = head.get(predictor, lambda: None)()
    opt = torch.optim.SGD(head.parameters(), lr=0.05) if isinstance(head, LinearPredictor) else None
    recorder = SpectrumRecorder(d, every=5)
    metrics = []
    for step in range(steps):
        t = step / steps
        scale = (1 - t) + t * strength  # (d,): directions grow or shrink over training
        z = torch.randn(batch, d, generator=g) * scale
        if opt is not None:
            opt.zero_grad()
            (head(z + 0.1 * torch.randn(batch, d, generator=g)) - z).square().mean().backward()
            opt.step()
        elif head is not None:
            head(z)
        scalars = recorder.observe(step, z, head) or {}
        if step % 10 == 0:
            line = {
                "kind": "train",
                "step": step,
                "epoch": step / steps_per_epoch,
                "loss": 2.0 * np.exp(-speed * t) + 0.1,
                "lr": 0.03,
                "images_per_sec": 900.0 / speed + 20 * np.sin(step),
                "online_probe_acc": 0.1 + 0.5 * t * speed,
                "output_std": 1.0 - 0.5 * t / speed,
                "skipped_updates": 0,
                "unconverged_solves": 0,
                "time_s": step * 0.1,
                "future_key": "tolerated",
            }
            line.update({k: scalars.get(k) for k in ("effective_rank", "f_eig_max", "f_eig_min")})
            metrics.append(line)
        if (step + 1) % steps_per_epoch == 0:
            epoch = (step + 1) / steps_per_epoch
            metrics.append({"kind": "eval", "step": step, "epoch": epoch, "knn_acc": 0.2 + 0.1 * epoch * speed})
    config = {
        "preset": "synthetic",
        "method": method,
        "predictor": predictor,
        "backbone": "none",
        "epochs": 3,
        "batch_size": batch,
        "data": "synthetic",
        "seed": 0,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if spectrum:
        recorder.save(folder / "spectrum.npz")
    if summary:
        result = {
            "linear_probe_acc": 0.6 + 0.05 * seed,
            "linear_probe_acc_random_init": 0.3,
            "knn_acc": 0.5,
            "output_std": 0.5,
            "effective_rank": 6.0,
            "images_per_sec": 910.0,
            "wall_time_s": 6.0,
        }
        (folder / "summary.json").write_text(json.dumps(result))
    return folder


def _assert_pngs(paths):
    import matplotlib.image

    for path in paths:
        assert Path(path).read_bytes()[:8] == PNG_MAGIC, path
        height, width, _ = matplotlib.image.imread(path).shape
        assert height >= 500 and width >= 1000, (path, height, width)


def _texts(fig):
    return " | ".join(t.get_text() for ax in fig.axes for t in ax.texts + [ax.title])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three synthetic run folders, read-only for the tests (copy one to change it)."""
    root = tmp_path_factory.mktemp("runs")
    return {p: write_run(root / p, predictor=p, seed=i) for i, p in enumerate(("directpred", "linear", "mlp"))}


def test_one_run_writes_overview_and_spectrum(tmp_path, capsys, runs):
    run = Path(shutil.copytree(runs["directpred"], tmp_path / "run"))
    assert main([str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "plots" / "run-overview.png"), str(run / "plots" / "run-spectrum.png")]
    _assert_pngs(printed)
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["run-overview.png", "run-spectrum.png"]


def test_three_runs_write_per_run_and_comparison_figures(tmp_path, capsys, runs):
    # One complete run, one without summary.json (unfinished), one without spectrum.npz: all are drawn.
    folders = [shutil.copytree(runs[p], tmp_path / name) for name, p in zip("abc", runs, strict=True)]
    (folders[1] / "summary.json").unlink()
    (folders[2] / "spectrum.npz").unlink()
    out = tmp_path / "figures"
    assert main([str(r) for r in folders] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    expected = [f"{n}-{k}.png" for n in "abc" for k in ("overview", "spectrum")]
    expected += ["compare-overview.png", "compare-spectrum.png"]
    assert printed == [str(out / name) for name in expected]
    _assert_pngs(printed)


def test_same_folder_names_and_labels_stay_distinct(tmp_path, runs):
    folders = [shutil.copytree(runs["directpred"], tmp_path / parent / "seed0") for parent in ("x", "y")]
    loaded = [load_run(f) for f in folders + [runs["linear"]]]
    make_unique(loaded)
    assert [r.name for r in loaded] == ["seed0", "seed0-2", "linear"]
    assert [r.label for r in loaded] == ["byol + directpred (seed0)", "byol + directpred (seed0-2)", "byol + linear"]


def test_linear_head_spectrum_is_aligned_and_nearly_symmetric_by_the_end(runs):
    # The synthetic linear head is trained towards the identity map of z: its plot must show that.
    spectrum = load_run(runs["linear"]).spectrum
    assert spectrum["asymmetry"][-1] < 0.7 * spectrum["asymmetry"][0]
    assert np.mean(spectrum["alignment"][-1]) > np.mean(spectrum["alignment"][0]) + 0.3


def test_absent_spectrum_summary_and_config_are_drawn_as_not_recorded(tmp_path, runs):
    run = Path(shutil.copytree(runs["directpred"], tmp_path / "bare"))
    for name in ("spectrum.npz", "summary.json", "config.json"):
        (run / name).unlink()
    loaded = load_run(run)
    assert loaded.spectrum is None and loaded.summary is None and loaded.label == "bare"
    assert _texts(spectrum_figure(loaded)).count("not recorded (no spectrum.npz)") == 4
    overview = _texts(overview_figure([loaded], ["C0"]))
    assert "no summary.json (unfinished run?)" in overview and "(no config.json)" in overview
    (run / "metrics.jsonl").write_text("")  # a run that has not logged yet
    assert _texts(overview_figure([load_run(run)], ["C0"])).count("not recorded") == 5


def test_mlp_run_has_f_but_no_w_panels(runs):
    fig = spectrum_figure(load_run(runs["mlp"]))
    assert _texts(fig).count("not recorded (predictor: mlp, no linear W)") == 3
    assert "eigenvalues of F (z^T z / N of the record step)" in _texts(fig)


def test_wide_single_record_spectrum_is_subsampled_and_hides_rounding_zeros(tmp_path):
    d = 300
    s = np.concatenate([np.geomspace(10.0, 0.1, d // 2), np.full(d // 2, 1e-17)])[None]  # rank-deficient F
    spectrum = {"step": np.array([0]), "f_eigs": s.astype(np.float32), "effective_rank": np.array([100.0])}
    run = Run(tmp_path, "wide", "wide", {}, [], [], spectrum, None)
    texts = _texts(spectrum_figure(run))
    assert "eigenvalues of F (101 of 300 shown)" in texts  # every 3rd rank index, and the last
    assert "x largest (zero to rounding) not drawn" in texts
    assert texts.count("not recorded (predictor: ?, no linear W)") == 3


def test_truncated_last_line_is_skipped_with_a_note(tmp_path, capsys, runs, monkeypatch):
    run = Path(shutil.copytree(runs["directpred"], tmp_path / "killed"))
    complete = len(load_run(run).train)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 70, "epoch": 3.5, "lo')
    loaded = load_run(run)
    assert len(loaded.train) == complete and "skipped last line" in loaded.notes[0]
    monkeypatch.setattr(fastpred.plot.cli, "plot_runs", lambda runs, out: [out / "drawn.png"])  # drawing: tested above
    assert main([str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("note: ") and "skipped last line" in captured.err
    assert captured.out.split() == [str(run / "plots" / "drawn.png")]


def test_resumed_run_replaces_the_lines_it_logs_again(tmp_path):
    run = tmp_path / "resumed"
    run.mkdir()
    lines = [{"kind": "train", "step": s, "loss": 1.0} for s in (0, 10, 20, 30)]
    lines.append({"kind": "train", "step": 0, "loss": 2.0, "partial": '{"killed'})  # not JSON-breaking
    lines += [{"kind": "train", "step": s, "loss": 0.5} for s in (20, 30, 40)]  # resumed from the step-10 checkpoint
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:4] + lines[5:]) + "\n")
    loaded = load_run(run)
    assert [(r["step"], r["loss"]) for r in loaded.train] == [(0, 1.0), (10, 1.0), (20, 0.5), (30, 0.5), (40, 0.5)]


@pytest.mark.parametrize("make", ["missing", "empty_dir", "file"])
def test_bad_run_dir_is_one_error_line_and_exit_code_2(tmp_path, capsys, make, runs):
    path = tmp_path / "run"
    if make == "empty_dir":
        path.mkdir()
    elif make == "file":
        path.write_text("not a folder")
    good = Path(shutil.copytree(runs["directpred"], tmp_path / "good"))
    assert main([str(good), str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert str(path) in captured.err
    assert not (good / "plots").exists()  # nothing drawn when one of the folders is bad


def test_module_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastpred.plot", str(tmp_path / "nowhere")], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stdout == ""
