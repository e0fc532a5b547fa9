"""python -m fastpred.eval on a short digits run: every protocol in one process and in two (torchrun, gloo), against
the trainer's own final evaluation; a bare backbone state dict; the probes' shards; every bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="the evaluation's data path needs fastpred[data]")

from fastpred.eval.__main__ import main  # noqa: E402

# One epoch of the linear protocol on the digits: SGD (SimSiam's alternative) at a small batch, so that a
# handful of steps already beat chance; the published LARS settings need ImageNet's thousands of steps.
LINEAR = ["--protocol", "linear", "--optimizer", "sgd", "--batch-size", "64", "--lr", "3"]
PROBE_EPOCHS = "20"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch digits run (kNN every epoch, final probes), counting the trainer's feature extractions."""
    from fastpred.train.__main__ import main as train_main
    from fastpred.train.evaluation import EvalCalendar
    from fastpred.train.loop import Trainer

    cache = tmp_path_factory.mktemp("cache")
    run = tmp_path_factory.mktemp("runs") / "run"
    calls = []
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTPRED_CACHE", str(cache))
        features, train_step, steps = EvalCalendar.features, Trainer.train_step, [0]

        def counted_step(self, *batch):
            steps[0] += 1
            return train_step(self, *batch)

        def counted(self, backbone):
            calls.append(steps[0])
            return features(self, backbone)

        mp.setattr(Trainer, "train_step", counted_step)
        mp.setattr(EvalCalendar, "features", counted)
        argv = ["--epochs", "2", "--final-probe-epochs", PROBE_EPOCHS, "--proj-dim", "16", "--progress", "plain",
                "--out", str(run)]
        assert train_main(argv) == 0
    torch.set_num_threads(threads)
    return {"run": run, "cache": cache, "summary": json.loads((run / "summary.json").read_text()),
            "extractions": calls}


@pytest.fixture
def cache_env(trained, monkeypatch):
    monkeypatch.setenv("FASTPRED_CACHE", str(trained["cache"]))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # FFCV sets torch's thread count to its worker count


def _result(folder, protocol):
    return json.loads((folder / f"eval-{protocol}.json").read_text())


def test_trainer_extracts_once_per_evaluation_point(trained):
    # Epoch 1's monitor, epoch 2's monitor (reused by the final kNN and probe), the random-init backbone.
    steps_per_epoch = trained["summary"]["steps"] // 2
    assert trained["extractions"] == [steps_per_epoch, 2 * steps_per_epoch, 2 * steps_per_epoch]


def test_one_process_equals_the_trainer_and_two_processes_agree(trained, cache_env, tmp_path, capsys):
    run, summary = trained["run"], trained["summary"]
    assert main([str(run)]) == 0
    knn = _result(run, "knn")
    assert knn["top1"] == summary["knn_acc"]  # same checkpoint, same sets, same batches: same features and votes
    assert knn["step"] == summary["steps"] and knn["settings"] == {"k": 20, "temperature": 0.07}
    assert knn["train"]["images"] == 1437 and knn["val"]["images"] == 360 and knn["world_size"] == 1
    assert main([str(run), "--protocol", "probe"]) == 0
    probe = _result(run, "probe")
    assert abs(probe["top1"] - summary["linear_probe_acc"]) <= 0.02 and probe["top5"] >= probe["top1"]
    assert probe["settings"]["epochs"] == int(PROBE_EPOCHS)  # the run's --final-probe-epochs
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in out] == ["knn", "probe"]  # one line per evaluation

    # Two processes, in one torchrun: kNN, probe and one epoch of the linear protocol.
    two = tmp_path / "two"
    shutil.copytree(run, two)
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import torch.distributed as dist\nfrom fastpred.eval.__main__ import main\n"
        "dist.init_process_group('gloo')  # once: main() uses a group it finds\n"
        f"for extra in ([], ['--protocol', 'probe'], {LINEAR + ['--epochs', '1']!r}):\n"
        f"    assert main([{str(two)!r}, *extra]) == 0\n"
        "dist.destroy_process_group()\n"
        # Once seen in CI: a worker aborted ("terminate called without an active exception") in interpreter
        # finalisation, after every evaluation had passed and written its file, while numba's dispatcher
        # finalizers failed; what ends the interpreter is not what this test checks, so it is skipped.
        "import os, sys\nsys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n"
    )
    env = {**os.environ, "FASTPRED_CACHE": str(trained["cache"]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("knn: top-1") == 1  # rank 0 speaks
    knn2, probe2, linear2 = (_result(two, p) for p in ("knn", "probe", "linear"))
    assert knn2["world_size"] == probe2["world_size"] == linear2["world_size"] == 2
    assert knn2["top1"] == knn["top1"]
    assert abs(probe2["top1"] - probe["top1"]) <= 0.02
    assert linear2["top1"] > 0.2 and linear2["settings"]["epochs"] == 1  # chance is 0.1


def test_linear_one_process_stops_and_resumes(trained, cache_env, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(trained["run"], folder, ignore=shutil.ignore_patterns("eval-*"))
    assert main([str(folder), *LINEAR, "--epochs", "2", "--stop-after", "1"]) == 0
    assert not (folder / "eval-linear.json").exists()
    state = torch.load(folder / "eval-linear.pt", weights_only=True)
    assert state["epoch"] == 1 and len(state["train_loss"]) == 1
    assert main([str(folder), *LINEAR, "--epochs", "2"]) == 2  # a fresh start would discard the state
    assert "--resume" in capsys.readouterr().err
    assert main([str(folder), *LINEAR, "--epochs", "3", "--resume"]) == 2  # not the same evaluation
    assert main([str(folder), *LINEAR, "--epochs", "2", "--resume"]) == 0
    assert "resuming the linear evaluation at epoch 1 of 2" in capsys.readouterr().out
    result = _result(folder, "linear")
    assert result["top1"] > 0.2 and result["top5"] >= result["top1"] and len(result["train_loss"]) == 2
    assert result["train_loss"][0] == state["train_loss"][0]
    assert torch.load(folder / "eval-linear.pt", weights_only=True)["epoch"] == 2


def test_bare_backbone_state_dict_with_arch(trained, cache_env, tmp_path):
    state = torch.load(trained["run"] / "checkpoint.pt", weights_only=True)
    bare = tmp_path / "backbone.pt"
    torch.save(state["backbone"], bare)
    folder = tmp_path / "elsewhere"  # a folder for another project's encoder: created with the result
    test = trained["cache"] / "digits-test.beton"
    argv = [str(folder), "--checkpoint", str(bare), "--arch", "small_cnn", "--resolution", "16",
            "--data", str(trained["cache"] / "digits-train.beton"), "--val", str(test)]
    assert main(argv) == 0
    result = _result(folder, "knn")
    assert result["top1"] == trained["summary"]["knn_acc"] and result["step"] is None


def test_each_rank_reads_a_disjoint_shard_and_together_every_image(trained, cache_env):
    from fastpred.core.models import build_backbone
    from fastpred.data.augment import normalize_uint8
    from fastpred.eval.features import ProbeSets, extract_features

    torch.manual_seed(0)
    backbone = build_backbone("small_cnn")[0]
    paths = (trained["cache"] / "digits-train.beton", trained["cache"] / "digits-test.beton")

    def sets(rank, world):
        return ProbeSets(paths[0], None, paths[1], None, resolution=16, batch_size=256, workers=1,
                         device=torch.device("cpu"), rank=rank, world_size=world)

    whole = sets(0, 1)
    for name in ("train", "val"):
        shards = [sets(r, 2) for r in range(2)]
        read = [s.loader(name)._loader._loader.traversal_order.sample_order(0) for s in shards]
        assert all(len(r) > 0 for r in read) and not set(read[0]) & set(read[1])
        assert np.array_equal(np.concatenate(read), whole.indices[name])
        feats = [extract_features(backbone, s.loader(name), normalize_uint8, "cpu") for s in shards]
        one = extract_features(backbone, whole.loader(name), normalize_uint8, "cpu")
        assert torch.equal(torch.cat([f[0] for f in feats]), one[0])  # the same batches: bitwise the same
        assert torch.equal(torch.cat([f[1] for f in feats]), one[1])


def _five_class_beton(path):
    from fastpred.data.sources import ArraySource, digits
    from fastpred.data.write import write_beton

    test = digits("test")
    write_beton(ArraySource(test.images[:50], test.labels[:50] % 5, "five"), path, compress_probability=0.0,
                workers=1)


@pytest.mark.parametrize("case", ["no_checkpoint", "no_backbone", "wrong_arch", "label_counts", "protocol",
                                  "epochs_with_knn", "not_a_run", "bad_config"])
def test_bad_input_is_one_error_line_and_exit_2_with_nothing_written(trained, cache_env, tmp_path, capsys, case):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(trained["run"] / "config.json", folder / "config.json")
    if case != "no_checkpoint":
        shutil.copy(trained["run"] / "checkpoint.pt", folder / "checkpoint.pt")
    argv = [str(folder)]
    if case == "no_backbone":
        torch.save({"format": "fastpred-checkpoint-1", "step": 3}, tmp_path / "other.pt")
        argv += ["--checkpoint", str(tmp_path / "other.pt")]
    elif case == "wrong_arch":
        argv += ["--arch", "resnet18"]
    elif case == "label_counts":
        _five_class_beton(tmp_path / "five.beton")
        argv += ["--data", str(tmp_path / "five.beton"), "--val", str(trained["cache"] / "digits-test.beton")]
    elif case == "protocol":
        argv += ["--protocol", "svm"]
    elif case == "epochs_with_knn":
        argv += ["--epochs", "3"]
    elif case == "not_a_run":
        argv = [str(tmp_path / "missing")]
    elif case == "bad_config":  # another program's config.json: no backbone setting
        (folder / "config.json").write_text(json.dumps({"data": "digits"}))
    before = sorted(p.name for p in folder.iterdir())
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own checks
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    expected = {"no_checkpoint": "no checkpoint", "no_backbone": "no backbone", "wrong_arch": "does not match",
                "label_counts": "5 classes", "protocol": "invalid choice", "epochs_with_knn": "--epochs",
                "not_a_run": "no such run folder", "bad_config": "is not a fastpred run's config: backbone"}[case]
    assert expected in err[0]
    assert sorted(p.name for p in folder.iterdir()) == before
