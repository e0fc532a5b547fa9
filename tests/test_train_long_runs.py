"""What a 300-epoch run needs to survive: the divergence guard, the checkpoint history, same-command auto-resume,
a full disk, a resume on another number of processes, a worker killed under `torchrun --max-restarts`, and
preemption (SIGTERM to torchrun and its workers at once). Short real runs on --data synthetic."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fastpred.train import guard, loop, step
from fastpred.train.__main__ import main

pytest.importorskip("ffcv", reason="the trainer's data path needs fastpred[data]")

TINY = ["--data", "synthetic", "--proj-dim", "8", "--proj-hidden", "16", "--batch-size", "8", "--resolution", "8",
        "--log-every", "1", "--progress", "plain", "--spectrum-every", "2", "--synthetic-steps", "4"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # the digits preset sets one thread per process
    yield
    torch.set_num_threads(threads)


def _error(capsys, argv, code) -> str:
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run) if r["kind"] == "train"}


def _events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _load(path) -> dict:
    return torch.load(path, weights_only=True)


def _finite(state) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in guard.tensors_in(state) if t.is_floating_point())


def _snapshot(run) -> dict:
    return {p.name: p.read_bytes() for p in run.iterdir()}


def _nan_loss_at(monkeypatch, steps):
    """The loss value is NaN at these steps (1-based), its gradient unchanged: non-finite losses, finite weights."""
    real, calls = step.ssl_loss, [0]

    def patched(p, t, method):
        calls[0] += 1
        loss = real(p, t, method)
        return loss + float("nan") if calls[0] in steps else loss

    monkeypatch.setattr(step, "ssl_loss", patched)


# --- divergence -----------------------------------------------------------------------------------------------
def test_nonfinite_losses_end_the_run_and_the_last_good_checkpoint_rescues_it(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    argv = [*TINY, "--epochs", "3", "--out", str(run)]
    _nan_loss_at(monkeypatch, range(6, 100))
    line = _error(capsys, argv, 3)
    # Steps 6, 7, 8 non-finite: the third one ends the run, before the checkpoint at the end of epoch 2 (step 8).
    assert "the loss was non-finite at 3 consecutive steps, from step 6 to step 8" in line
    assert f"last good checkpoint: {run / 'checkpoint.pt'} (epoch 1, step 4)" in line
    assert f"--resume {run} --lr 0.005" in line
    state = _load(run / "checkpoint.pt")
    assert state["step"] == 4 and _finite(state)
    assert _events(run)[-1]["event"] == "diverged" and _events(run)[-1]["checkpoint_step"] == 4

    # The same command again does not loop on the divergence: it refuses, and touches nothing.
    before = _snapshot(run)
    assert "this run diverged at step 8" in _error(capsys, [*argv, "--auto-resume"], 3)
    assert _snapshot(run) == before

    monkeypatch.undo()
    assert main(["--resume", str(run), "--lr", "0.01"]) == 0
    assert sorted(_losses(run)) == list(range(1, 13))  # steps 5.. logged again from the checkpoint
    resume = _events(run)[-1]
    assert resume["event"] == "resume" and resume["step"] == 4 and resume["changed"] == {"lr": [0.05, 0.01]}
    assert json.loads((run / "config.json").read_text())["lr"] == 0.01
    assert _load(run / "checkpoint.pt")["config"]["lr"] == 0.01


def test_the_guard_adds_no_host_wait_to_a_step():
    """The run of non-finite losses is kept on the device step by step, and the finiteness of a set of tensors is
    one device value: neither reads anything on the host (counted as a CUDA synchronisation would be)."""
    from host_syncs import HostSyncCounter

    watch = guard.DivergenceGuard(None, rank=0, limit=3, lr=0.1, device=torch.device("cpu"))
    watch.start()
    count = torch.zeros(())  # the interval's count of non-finite losses, as train_step accumulates it
    runs = []
    with HostSyncCounter() as counter:
        for bad in (1, 1, 0, 1, 1, 1):
            count += bad
            watch.after_step(count)
            runs.append(watch.nonfinite[0].clone())
        finite = [guard.all_finite([torch.ones(3), bad], torch.device("cpu"))
                  for bad in (torch.zeros(2), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")]))]
    assert counter.hits == []
    assert [int(r) for r in runs] == [1, 2, 0, 1, 2, 3]
    assert [bool(f) for f in finite] == [True, False, False]


def test_a_short_run_of_nonfinite_losses_is_counted_not_fatal(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _nan_loss_at(monkeypatch, {3, 4})
    assert main([*TINY, "--epochs", "2", "--out", str(run)]) == 0  # 2 < --max-nonfinite-steps 3
    assert sum(r.get("nonfinite_losses", 0) for r in _metrics(run)) == 2
    _nan_loss_at(monkeypatch, {3, 4})
    assert main([*TINY, "--epochs", "2", "--max-nonfinite-steps", "2", "--out", str(tmp_path / "strict")]) == 3


def test_a_huge_learning_rate_diverges_and_no_checkpoint_holds_a_nan(tmp_path, capsys):
    run = tmp_path / "run"
    line = _error(capsys, [*TINY, "--epochs", "3", "--lr", "1e9", "--synthetic-steps", "8", "--out", str(run)], 3)
    assert "training diverged: non-finite parameters at step" in line and "first non-finite loss at step" in line
    checkpoints = list(run.glob("*.pt"))
    assert all(_finite(_load(p)) for p in checkpoints)
    assert checkpoints or "no checkpoint was written before it" in line


def test_a_nonfinite_state_is_never_checkpointed(tmp_path, capsys, monkeypatch):
    """The optimizer's momentum is not in the per-interval check of the weights: the check at the checkpoint,
    over everything it would hold, catches it."""
    run = tmp_path / "run"
    real = loop.Trainer.train_step

    def step_then_spoil(self, *args):
        real(self, *args)
        if self.step == 8:  # the last step of epoch 2
            next(iter(self.optimizer.state.values()))["momentum_buffer"].fill_(float("inf"))

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_spoil)
    line = _error(capsys, [*TINY, "--epochs", "3", "--out", str(run)], 3)
    assert "non-finite values in the state to checkpoint at step 8 (first: optimizer.state." in line
    assert "(epoch 1, step 4)" in line
    assert _load(run / "checkpoint.pt")["step"] == 4


def test_a_signal_in_the_final_evaluation_stops_at_once(tmp_path, monkeypatch):
    """The last step's checkpoint is written; waiting for the final probe (hours on ImageNet) would outlast any
    grace period, and a resume runs it again."""
    run = tmp_path / "run"

    def final_evaluation(self, wall):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends
        raise AssertionError("the signal did not stop the final evaluation")

    monkeypatch.setattr(loop.Trainer, "_finish", final_evaluation)
    assert main([*TINY, "--epochs", "2", "--out", str(run)]) == 128 + signal.SIGTERM
    assert _load(run / "checkpoint.pt")["step"] == 8 and not (run / "summary.json").exists()
    monkeypatch.undo()
    assert main([*TINY, "--epochs", "2", "--out", str(run), "--auto-resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_a_signal_after_the_last_step_does_not_wait_for_the_final_evaluation(tmp_path, monkeypatch):
    """A request that comes after the last interval's check (here: during the last checkpoint's write) stops the
    run before its final evaluation, as one during it would."""
    run = tmp_path / "run"
    real = loop.Trainer._save_checkpoint

    def save_then_signal(self):
        real(self)
        if self.step == 8:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop.Trainer, "_save_checkpoint", save_then_signal)
    assert main([*TINY, "--epochs", "2", "--out", str(run)]) == 128 + signal.SIGTERM
    assert _load(run / "checkpoint.pt")["step"] == 8 and not (run / "summary.json").exists()


# --- checkpoint history -----------------------------------------------------------------------------------
def test_keep_every_keeps_a_checkpoint_per_period(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--epochs", "5", "--keep-every", "2", "--checkpoint-every", "3", "--out", str(run)]) == 0
    kept = sorted(p.name for p in run.glob("checkpoint-epoch*.pt"))
    assert kept == ["checkpoint-epoch0002.pt", "checkpoint-epoch0004.pt"]
    for name, epoch in zip(kept, (2, 4), strict=True):
        state = _load(run / name)
        assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (epoch, 4 * epoch, 0)
    assert _load(run / "checkpoint.pt")["step"] == 20
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# --- auto-resume ------------------------------------------------------------------------------------------
def test_auto_resume_starts_continues_finishes_and_refuses_another_run(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [*TINY, "--epochs", "3", "--out", str(run), "--auto-resume"]
    assert main([*argv, "--max-steps", "5"]) == 0  # a new run, cut short (as by a crash after a checkpoint)
    assert main(argv) == 0  # continues it: --max-steps may change on resume
    assert sorted(_losses(run)) == list(range(1, 13))
    assert [e["event"] for e in _events(run)] == ["start", "auto-resume"] and _events(run)[1]["step"] == 5

    capsys.readouterr()
    before = _snapshot(run)
    assert main(argv) == 0
    assert "this run has finished" in capsys.readouterr().out
    assert "holds a different run (rho is 0.3 there, 0.5 here)" in _error(capsys, [*argv, "--rho", "0.5"], 2)
    assert "--auto-resume needs --out DIR" in _error(capsys, [*TINY, "--auto-resume"], 2)
    assert _snapshot(run) == before


def test_auto_resume_starts_again_a_run_killed_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "run"
    argv = [*TINY, "--epochs", "2", "--out", str(run), "--auto-resume"]
    assert main(argv) == 0
    for name in ("checkpoint.pt", "summary.json"):  # what a kill in the first epoch leaves: config and metrics
        (run / name).unlink()
    first = _losses(run)
    assert main(argv) == 0
    assert _losses(run) == first  # logged once each, the same run again
    assert [e["event"] for e in _events(run)] == ["start", "restart"]


# --- the run folder cannot be written -----------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["ENOSPC", "EACCES"])
def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, capsys, monkeypatch, failure):
    if failure == "ENOSPC" and not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to fill the disk")
    run = tmp_path / "run"
    real, made = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        fd, path = real(*args, **kwargs)
        if os.path.basename(path).startswith(".checkpoint.pt."):
            made.append(path)
            if len(made) == 2:  # the second checkpoint
                if failure == "EACCES":
                    os.close(fd)
                    os.unlink(path)
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
                full = os.open("/dev/full", os.O_WRONLY)
                os.dup2(full, fd)  # every write to the temporary file now fails with ENOSPC, from the kernel
                os.close(full)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    line = _error(capsys, [*TINY, "--epochs", "3", "--out", str(run)], 4)
    reason = "No space left on device" if failure == "ENOSPC" else "Permission denied"
    assert f"cannot write {run / 'checkpoint.pt'}: {reason}; the previous checkpoint.pt is intact" in line
    assert _load(run / "checkpoint.pt")["step"] == 4
    assert not any(os.path.exists(p) for p in made) and not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_long_run_flags_that_cannot_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write in" in _error(capsys, [*TINY, "--out", str(blocker / "run")], 2)
    assert "--keep-every must be >= 0" in _error(capsys, [*TINY, "--keep-every", "-1"], 2)
    assert "--max-nonfinite-steps must be >= 0" in _error(capsys, [*TINY, "--max-nonfinite-steps", "-2"], 2)
    both = [*TINY, "--auto-resume", "--resume", str(tmp_path), "--out", str(tmp_path / "r")]
    assert "drop --resume" in _error(capsys, both, 2)
    run = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert "--lr must be > 0" in _error(capsys, ["--resume", str(run), "--lr", "-1"], 2)
    assert [e["event"] for e in _events(run)] == ["start"] and not (tmp_path / "r").exists()  # refusals write nothing


# --- many processes: torchrun, a killed worker, preemption, another world size -------------------------------
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
# The digits at 8 px, a tiny projector, 64 images per process: 11 steps per epoch, a line every 5 steps, and a final
# evaluation (kNN, probes) of a second or two, long enough to be killed in. --stop-within 1.2 s leaves a fraction of a
# second for steps after a stop request, so that the processes compare requests between log intervals.
STEPS_PER_EPOCH = 11
TORCHRUN_RUN = ["--data", "digits", "--batch-size", "64", "--resolution", "8", "--proj-dim", "8", "--proj-hidden",
                "16", "--log-every", "5", "--spectrum-every", "0", "--progress", "plain", "--knn-every", "0",
                "--final-probe-epochs", "10", "--seed", "3", "--stop-within", "1.2"]
# The soak: FASTPRED_SOAK=1 restarts a run 12 times (a worker SIGKILLed mid-epoch and at the checkpoint of epochs
# 1-5, one SIGTERMed, then one SIGKILLed in the final evaluation); the suite's short form restarts it 4 times.
SOAK = os.environ.get("FASTPRED_SOAK") == "1"
EPOCHS = 6 if SOAK else 3


def _launch(out, *launcher_flags, plain=False, epochs=EPOCHS):
    """torchrun on two gloo processes at one thread each, in a session of its own; --auto-resume makes the command
    restartable. `plain`: torchrun as it is; otherwise `python -m fastpred.train.torchrun` (a stop by signal exits
    128 + signal)."""
    launcher = "torch.distributed.run" if plain else "fastpred.train.torchrun"
    cmd = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node", "2", *launcher_flags,
           "-m", "fastpred.train", *TORCHRUN_RUN, "--epochs", str(epochs), "--out", str(out), "--auto-resume"]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}  # torchrun's default
    return subprocess.Popen(cmd, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _workers(proc) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (its children that have a RANK), from /proc."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
            if int(stat.read_text().rpartition(")")[2].split()[1]) != proc.pid:
                continue
            raw = (stat.parent / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
        env = dict(v.split(b"=", 1) for v in raw.split(b"\0") if b"=" in v)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(stat.parent.name)
    return ranks


def _wait_for_step(proc, run, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and any(s >= step for s in _losses_safe(run)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} logged in {timeout} s:\n{_finish(proc)[-3000:]}")


def _losses_safe(run) -> list[int]:
    steps = []
    if not (run / "metrics.jsonl").exists():
        return steps
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return steps


def _finish(proc, timeout=240) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:  # never leave a launcher or its workers behind
            for pid in [*_workers(proc).values(), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("torchrun") / "whole"
    proc = _launch(run)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    return run


def _checkpoint_step(run) -> int | None:
    try:
        return _load(run / "checkpoint.pt")["step"]  # replaced atomically: never half-written
    except (OSError, RuntimeError, EOFError):
        return None


def _starts(run) -> int:
    """How many attempts have started the run (each truncates the metrics logged after its checkpoint first)."""
    try:
        return sum(e["event"] in ("start", "restart", "auto-resume") for e in _events(run))
    except (OSError, ValueError):
        return 0  # not written yet, or a line being written


def _kill_when(proc, run, point: str, epoch: int, rank: int, attempt: int, timeout=240) -> None:
    """Waits for `point` of the run (mid-epoch: a line logged inside `epoch`; checkpoint: the checkpoint at the
    end of `epoch` written; final: the last checkpoint written, the final evaluation under way), then SIGKILLs the
    worker of `rank` (point "stop": SIGTERMs it mid-epoch, which stops every worker at one step, with exit 143:
    torchrun restarts them as after a failure). Only what attempt `attempt` (1-based) logged counts: the lines a
    killed attempt left are dropped by the next one when it starts."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if _starts(run) < attempt:
            ready = False
        elif point in ("mid-epoch", "stop"):
            logged = [s for s in _losses_safe(run) if (epoch - 1) * STEPS_PER_EPOCH < s < epoch * STEPS_PER_EPOCH]
            ready = bool(logged) and _checkpoint_step(run) in (None, (epoch - 1) * STEPS_PER_EPOCH)
        elif point == "checkpoint":
            ready = _checkpoint_step(run) == epoch * STEPS_PER_EPOCH
        else:
            ready = _checkpoint_step(run) == epoch * STEPS_PER_EPOCH and not (run / "summary.json").exists()
        if ready:
            os.kill(_workers(proc)[rank], signal.SIGTERM if point == "stop" else signal.SIGKILL)
            return
        time.sleep(0.02)
    raise AssertionError(f"never reached {point} of epoch {epoch}:\n{_finish(proc)[-3000:]}")


def _restarted(proc, killed: dict[int, int], timeout=240) -> dict[int, int]:
    """The workers of the next attempt, once both run (none of them one of `killed`)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        workers = _workers(proc)
        if len(workers) == 2 and not set(workers.values()) & set(killed.values()):
            return workers
        time.sleep(0.05)
    raise AssertionError(f"torchrun did not restart its workers:\n{_finish(proc)[-3000:]}")


@linux_only
def test_plain_torchrun_restarts_after_workers_are_killed_at_several_points(tmp_path, uninterrupted):
    """Plain torchrun, nothing set: every restart starts its process group (none hangs in init_process_group on
    the previous attempt's keys in torchrun's shared store) and continues from the last checkpoint; the run ends
    with the uninterrupted run's losses, bitwise at one thread."""
    kills = [("mid-epoch", e) for e in range(1, EPOCHS)] + [("checkpoint", e) for e in range(1, EPOCHS)]
    kills = sorted(kills, key=lambda k: (k[1], k[0] == "checkpoint"))
    kills = [*kills[:3], ("stop", 2), *kills[3:], ("final", EPOCHS)]
    if not SOAK:
        kills = [("mid-epoch", 1), ("stop", 2), ("checkpoint", 2), ("final", EPOCHS)]
    run = tmp_path / "run"
    proc = _launch(run, "--max-restarts", str(len(kills)), plain=True)
    resumed_from = []
    try:
        for n, (point, epoch) in enumerate(kills):
            workers = _restarted(proc, {})
            _kill_when(proc, run, point, epoch, rank=n % 2, attempt=n + 1)
            _restarted(proc, workers)
            resumed_from.append(_checkpoint_step(run) or 0)  # what the new workers resume from
    finally:
        out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    resumed = [e for e in _events(run) if e["event"] in ("auto-resume", "restart")]  # restart: no checkpoint yet
    assert [e["step"] for e in resumed] == resumed_from, resumed
    assert [e["restart"] for e in resumed if e["event"] == "auto-resume"] == [
        n + 1 for n, step in enumerate(resumed_from) if step > 0]
    stops = [e["step"] for e in _events(run) if e["event"] == "stopped"]
    assert stops == [resumed_from[[p for p, _ in kills].index("stop")]]  # every process stopped at this step
    _assert_same_run(run, uninterrupted, stops[0])


def _assert_same_run(run, uninterrupted, stop: int) -> None:
    """The run's metrics and final weights are the uninterrupted run's, bitwise at one thread, but for the stop at
    step `stop`: it logged a line of its own, and the line that ends its interval averages fewer steps."""
    ours, theirs = _losses(run), _losses(uninterrupted)
    split = {stop, min(-(-stop // 5) * 5, -(-stop // STEPS_PER_EPOCH) * STEPS_PER_EPOCH)}  # --log-every 5
    assert {k: v for k, v in ours.items() if k not in split} == {k: v for k, v in theirs.items() if k not in split}
    assert set(ours) - set(theirs) <= {stop} and set(theirs) <= set(ours)
    final, whole = _load(run / "checkpoint.pt"), _load(uninterrupted / "checkpoint.pt")
    assert final["step"] == whole["step"] == EPOCHS * STEPS_PER_EPOCH
    for part in ("backbone", "projector", "predictor", "target_backbone", "target_projector"):
        assert all(torch.equal(final[part][k], whole[part][k]) for k in whole[part]), part


def test_stop_checks_are_planned_to_fit_stop_within(capsys):
    """Under torchrun the processes compare stop requests every `every` steps: as many steps as fit --stop-within
    with a checkpoint write (1.5 x the last) and a second, at most one log interval; before any step is measured,
    after every step. One process needs no check."""
    from fastpred.train.stops import StopRequests

    stops = StopRequests(None, rank=0, world_size=2, within_s=20)
    assert stops.every == 1
    stops.plan(step_s=0.1, save_s=1.0, log_every=50)
    assert stops.every == 50
    stops.plan(step_s=2.0, save_s=4.0, log_every=50)
    assert stops.every == 6 and [s for s in range(1, 20) if stops.check_due(s)] == [6, 12, 18]  # (20 - 6 - 1) / 2
    assert capsys.readouterr().err == ""
    stops.plan(step_s=30.0, save_s=4.0, log_every=50)
    assert stops.every == 1
    assert "warning: a step (30.0 s) and a checkpoint write (4.0 s) take longer than --stop-within 20 s: a stop " \
           "request will take about 34 s" in capsys.readouterr().err
    assert not StopRequests(None, rank=0, world_size=1).check_due(6)


@linux_only
def test_torchrun_preemption_stops_cleanly_and_the_same_command_finishes(tmp_path, capsys, uninterrupted):
    """SIGTERM to the launcher and both workers while another process keeps the other core busy: the stop still
    fits torchrun's grace period and leaves the checkpoint."""
    run = tmp_path / "run"
    proc = _launch(run)
    _wait_for_step(proc, run, STEPS_PER_EPOCH + 3)
    workers = _workers(proc)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        signalled = time.time()
        for pid in (proc.pid, *workers.values()):  # what SLURM does at preemption: every process of the job step
            os.kill(pid, signal.SIGTERM)
        out = _finish(proc)
    finally:
        busy.kill()
        busy.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert time.time() - signalled < 30  # torchrun's grace period before it SIGKILLs its workers
    assert "Traceback" not in out and "ChildFailedError" not in out and "forcefully" not in out
    state = _load(run / "checkpoint.pt")
    assert f"stopped at step {state['step']}; checkpoint written" in out and state["step"] > STEPS_PER_EPOCH
    assert state["world_size"] == 2 and state["global_batch"] == 128
    assert state["batch_in_epoch"] == state["step"] % STEPS_PER_EPOCH
    assert _events(run)[-1]["event"] == "stopped"

    # One process cannot continue it silently (global batch 64 instead of 128); keeping the global batch can.
    other = tmp_path / "other"
    shutil.copytree(run, other)
    line = _error(capsys, ["--resume", str(other)], 2)
    assert "written by 2 process(es) with a global batch of 128" in line and "--batch-size 128" in line
    assert main(["--resume", str(other), "--batch-size", "128", "--final-probe", "false"]) == 0
    assert _events(other)[-1]["changed"] == {"batch_size": [64, 128], "world_size": [2, 1]}
    assert _load(other / "checkpoint.pt")["step"] == EPOCHS * STEPS_PER_EPOCH

    proc = _launch(run)  # the job, requeued: the same command
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    _assert_same_run(run, uninterrupted, state["step"])
