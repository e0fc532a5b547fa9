"""No wait for another process or thread is unbounded: the process group's start (a fresh namespace in torchrun's
shared store, a process that never joins), collectives past --dist-timeout, the watchdog for waits inside C++, the
writer's workers and FFCV's loader threads. Each ends with one line naming what it waited for and its exit code."""

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from fastpred.core import distributed

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world_size: int, port: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "RANK", "WORLD_SIZE"))}
    return {**env, **ONE_THREAD, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra}


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def _reaped(*procs):
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


# --- the process group's start ----------------------------------------------------------------------------------
def _start_in_threads(store, world_size: int, delays: dict[int, float]) -> dict[int, dist.Store]:
    out, failures = {}, []

    def join(rank):
        time.sleep(delays.get(rank, 0.0))
        try:
            out[rank] = distributed._fresh_namespace(store, rank, world_size)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(e)

    threads = [threading.Thread(target=join, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not failures and len(out) == world_size, (failures, sorted(out))
    return out


def test_a_restart_agrees_on_a_namespace_the_previous_starts_never_used():
    """torchrun's agent keeps one store across restarts. What two previous starts left in it (one finished its
    start, one died halfway, before rank 0 said go) must not lead a restarted process astray, whichever process
    of the new start comes first."""
    store = dist.HashStore()
    first = _start_in_threads(store, 3, {})
    first[0].set("addr/0", "dead")  # a key of the first start's process group
    token_key = "fastpred/run/token"
    store.set(token_key, "halfway")  # a start whose rank 0 died before every process had acknowledged it
    store.set("fastpred/run/halfway/ack/1", "1")
    for delays in ({0: 0.5}, {1: 0.5, 2: 0.3}):  # rank 0 late: the others first read a previous start's token
        new = _start_in_threads(store, 3, delays)
        new[0].set("probe", "this start")
        assert {new[r].get("probe") for r in (1, 2)} == {b"this start"}  # one namespace, shared by all
        assert not new[1].check(["addr/0"])  # and none of the previous start's keys in it
    assert store.get(token_key) not in (b"halfway",)


def test_a_process_that_never_joins_ends_the_others_within_the_bound(tmp_path):
    """Rank 0 of the trainer waits for rank 1, which never comes; rank 1 of the evaluation waits in torchrun's
    agent store, which holds only a previous start's token, for a rank 0 that never comes. Both end within
    --start-timeout with exit 5 and a line naming whom they waited for."""
    import torch

    from fastpred.core.models import build_backbone

    torch.save(build_backbone("small_cnn")[0].state_dict(), tmp_path / "bare.pt")  # read before the start
    trainer_port, agent_port = _free_port(), _free_port()
    agent = dist.TCPStore("127.0.0.1", agent_port, 2, is_master=True, wait_for_workers=False)  # the agent's store
    agent.set("fastpred/run/token", "previous")
    agent.set("fastpred/run/previous/go", "1")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "fastpred.train", "--data", "synthetic", "--start-timeout", "3", "--out",
         str(tmp_path / "run")],
        env=_env(0, 2, trainer_port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    evaluation = subprocess.Popen(
        [sys.executable, "-m", "fastpred.eval", str(tmp_path / "none"), "--checkpoint", str(tmp_path / "bare.pt"),
         "--arch", "small_cnn", "--data", "digits", "--start-timeout", "3"],
        env=_env(1, 2, agent_port, TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with _reaped(trainer, evaluation):
        outputs = {name: p.communicate(timeout=120) for name, p in (("train", trainer), ("eval", evaluation))}
    assert trainer.returncode == evaluation.returncode == distributed.EXIT_START_TIMEOUT, outputs
    train_errors, eval_errors = _errors(outputs["train"][1]), _errors(outputs["eval"][1])
    assert train_errors == ["error: process 0 of 2: waited 3 s for process(es) 1 of 2 to join; giving up "
                            "(exit code 5)"], outputs["train"]
    assert eval_errors == ["error: process 1 of 2: waited 3 s for process 0 to start the process group (torchrun "
                           "restart 1); giving up (exit code 5)"], outputs["eval"]
    assert not (tmp_path / "run").exists()  # nothing was written before every process was there


# --- collectives and the watchdog -------------------------------------------------------------------------------
PEER_SCRIPT = textwrap.dedent("""
    import sys, time
    from fastpred.core import distributed
    rank, world, _ = distributed.setup("cpu", timeout_min=0.05, start_timeout_s=60)
    if rank == 1:
        time.sleep(60)  # never reaches the barrier
    try:
        distributed.barrier("the others before the checkpoint")
    except distributed.WaitFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.code)
""")


def test_a_barrier_past_the_timeout_names_what_it_waited_for():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", PEER_SCRIPT], env=_env(r, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    with _reaped(*procs):
        _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == distributed.EXIT_PEER_LOST, err
    (line,) = _errors(err)
    assert line.startswith("error: process 0 of 2: gave up waiting for the others before the checkpoint "
                           "(--dist-timeout 0.05 min): another process stopped answering or left ("), line


def test_the_watchdog_ends_a_wait_no_exception_can_interrupt():
    script = ("import time\nfrom fastpred.core import distributed\n"
              "with distributed.bounded('a store that never answers', 0.5, 6):\n    time.sleep(60)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **ONE_THREAD}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 6
    assert _errors(done.stderr) == ["error: waited 0.5 s for a store that never answers; giving up (exit code 6)"]
    assert time.monotonic() - started < 60


def test_nested_waits_keep_their_own_bounds():
    with distributed.bounded("outer", 30, 6):
        with distributed.bounded("inner", 30, 6):
            distributed._watchdog.relabel("inner, later")
            assert [e[1] for e in distributed._watchdog._armed] == ["outer", "inner, later"]
        assert [e[1] for e in distributed._watchdog._armed] == ["outer"]
    assert distributed._watchdog._armed == []


# --- the writer's workers and FFCV's loader threads -------------------------------------------------------------
class _HangsAt:
    """Images 0.. of a small source; reading image `stuck` never returns (a file on a dead network mount)."""

    def __init__(self, n: int, stuck: int | None):
        self.n, self.stuck, self.name = n, stuck, "hangs"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.stuck:
            time.sleep(3600)
        return np.full((8, 8, 3), i, dtype=np.uint8), i % 3


def test_a_stuck_writer_worker_ends_the_write_within_the_bound(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ffcv")
    from fastpred.data import write

    monkeypatch.setattr(write, "open_source", lambda src, split: _HangsAt(40, stuck=7))
    out = tmp_path / "out.beton"
    started = time.monotonic()
    code = write.main(["ignored", str(out), "--workers", "2", "--stall-timeout", "1"])
    assert code == write.EXIT_STALLED and time.monotonic() - started < 60
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith("error: waited 1 s for the writer processes to finish an image (") and "one is stuck" in line
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory):
    pytest.importorskip("ffcv")
    from fastpred.data.write import write_beton

    path = tmp_path_factory.mktemp("beton") / "small.beton"
    write_beton(_HangsAt(96, stuck=None), path, compress_probability=0.0, workers=1)
    return path


def _ffcv_threads() -> list[threading.Thread]:
    from ffcv.loader.epoch_iterator import EpochIterator

    return [t for t in threading.enumerate() if isinstance(t, EpochIterator)]


@pytest.mark.parametrize("batch", [8, 48])
def test_an_abandoned_epoch_stops_its_loader_thread(small_beton, batch):
    """Batches of 8: the thread is still decoding; of 48 (two in all, one queued ahead): it has queued the last
    batch and blocks in FFCV's last put, the end of the epoch, which has no timeout."""
    from fastpred.data import EvalLoader

    loader = EvalLoader(small_beton, batch, 8, crop_ratio=1.0, num_workers=1, batches_ahead=1)
    batches = iter(loader)
    next(batches)
    assert _ffcv_threads()
    time.sleep(0.5)  # time to fill the queue
    started = time.monotonic()
    batches.close()  # what a stop or --max-steps does to the epoch's generator
    assert _ffcv_threads() == []  # joined before close() returned, not left decoding into released memory
    assert time.monotonic() - started < 5


def test_a_loader_thread_that_dies_is_an_error_not_a_wait(small_beton, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    from fastpred.data import DataError, EvalLoader

    def broken(self, *args):
        raise ValueError("a corrupt page")

    monkeypatch.setattr(EpochIterator, "run_pipeline", broken)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # its traceback is FFCV's, printed as it is
    loader = EvalLoader(small_beton, 8, 8, crop_ratio=1.0, num_workers=1)
    outcome = []

    def consume():
        try:
            list(loader)
        except DataError as e:
            outcome.append(str(e))

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(30)
    assert not consumer.is_alive(), "the loader waited for a thread that had died"
    assert outcome == ["the FFCV loader's thread ended without finishing its epoch (its error is printed above)"]
