"""Processes under torchrun: one per GPU (NCCL) or per CPU worker (gloo); single-process runs skip all of it.

No wait for another process is unbounded. The process group's start (store, handshake, `init_process_group`, the
first collective) must finish within `start_timeout_s`; a collective or barrier within the group's timeout
(`--dist-timeout`). Past its bound a process prints one line naming what it waited for and for how long, and ends
with the exit code of that kind of wait (EXIT_START_TIMEOUT, EXIT_PEER_LOST). A watchdog thread enforces the bound
where the wait is inside C++ that no Python exception can interrupt (a gloo connect to a dead peer, a store read).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

#: Minutes a collective may wait for the slowest rank (`--dist-timeout`). Work is spread over the ranks, so what
#: one rank does while the others wait is short: rank 0 writing a checkpoint (a ResNet-50 run's is ~0.5 GB), a
#: first `torch.compile` that takes longer on one rank. 30 minutes covers slow storage and compilation with margin
#: (NCCL's own default is 10) and still ends a job whose rank has died within half an hour.
DEFAULT_TIMEOUT_MIN = 30.0
#: Seconds every process may take to reach the process group's start after the first one (`--start-timeout`).
#: torchrun starts the workers of a round together, after its own rendezvous; what separates them is importing
#: torch and the data libraries and reading the run folder (seconds; a minute from a slow network filesystem).
#: Five minutes is that with margin, and the longest a restarted job idles when a process never comes.
DEFAULT_START_TIMEOUT_S = 300.0
#: Exit codes of a wait past its bound (the trainer's and the evaluation's; 0-4 and 128 + N are theirs).
EXIT_START_TIMEOUT = 5  # the process group did not start in time: a process never joined, or none could connect
EXIT_PEER_LOST = 6  # a collective or barrier waited past --dist-timeout, or another process left it
#: How long the process group's shutdown may take; past it the process ends with the exit code it was ending with.
TEARDOWN_TIMEOUT_S = 60.0
# The watchdog's margin over --dist-timeout: gloo's own timeout ends a wait first (an exception, reported in one
# line by `waiting`); the watchdog is for a wait the backend does not end.
_WATCHDOG_MARGIN_S = 60.0
_POLL_S = 0.05  # handshake polling: one small store request per process and period

_timeout_s = DEFAULT_TIMEOUT_MIN * 60  # the process group's collective timeout, once setup() has run


class WaitFailed(Exception):
    """A wait for another process ended without it; `code` is the process's exit code, the message one line."""

    code = 1


class StartFailed(WaitFailed):
    """The process group did not start: the store or a peer gave up before the start's bound."""

    code = EXIT_START_TIMEOUT


class PeerLost(WaitFailed):
    """A collective or barrier failed: another process stopped answering within the timeout, or left."""

    code = EXIT_PEER_LOST


class _Watchdog:
    """One daemon thread that ends the process when an armed wait outlasts its bound.

    The main thread may be blocked inside C++ (a TCP connect, a store read, a collective) where no signal handler
    or exception reaches it; os._exit from another thread is the one exit that does not wait for it. Files of the
    run folder are written atomically or appended line by line and closed, so nothing written is lost. Waits nest
    (a barrier inside a bounded block): each keeps its own deadline."""

    def __init__(self):
        self._cond = threading.Condition()
        self._armed: list[list] = []  # [deadline (monotonic), what, seconds, exit code], innermost last
        self._thread: threading.Thread | None = None

    def arm(self, what: str, seconds: float, code: int) -> list:
        entry = [time.monotonic() + seconds, what, seconds, code]
        with self._cond:
            self._armed.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="fastpred-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return entry

    def relabel(self, what: str) -> None:
        """Say what the innermost wait waits for now, keeping its deadline (a start moving from step to step)."""
        with self._cond:
            if self._armed:
                self._armed[-1][1] = what

    def disarm(self, entry: list) -> None:
        with self._cond:
            self._armed.remove(entry)  # no notify: the thread finds it gone when it wakes

    def _watch(self) -> None:
        with self._cond:
            while True:
                if not self._armed:
                    self._cond.wait()
                    continue
                first = min(self._armed, key=lambda e: e[0])
                left = first[0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                _, what, seconds, code = first
                print(f"error: {_who()}waited {seconds:g} s for {what}; giving up (exit code {code})",
                      file=sys.stderr, flush=True)
                os._exit(code)


_watchdog = _Watchdog()


def _who() -> str:
    world = os.environ.get("WORLD_SIZE")
    return f"process {os.environ.get('RANK', '?')} of {world}: " if world and world != "1" else ""


@contextlib.contextmanager
def bounded(what: str, seconds: float, code: int) -> Iterator[None]:
    """Ends the process with `code` and one line naming `what` if the block takes longer than `seconds`."""
    entry = _watchdog.arm(what, seconds, code)
    try:
        yield
    finally:
        _watchdog.disarm(entry)


def setup(device_flag: str, timeout_min: float = DEFAULT_TIMEOUT_MIN,
          start_timeout_s: float = DEFAULT_START_TIMEOUT_S) -> tuple[int, int, torch.device]:
    """(rank, world size, device) for `--device auto|cpu|cuda`; initialises the process group under torchrun,
    with collectives that give up after `timeout_min` minutes and a start (every process present, the first
    collective done) that gives up after `start_timeout_s` seconds (exit EXIT_START_TIMEOUT, one line)."""
    global _timeout_s
    if not timeout_min > 0:
        raise ValueError(f"--dist-timeout must be > 0 minutes, got {timeout_min}")
    if not start_timeout_s > 0:
        raise ValueError(f"--start-timeout must be > 0 seconds, got {start_timeout_s}")
    want_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if want_cuda else "cpu")
    missing = [v for v in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"RANK is set but {', '.join(missing)} not: start the processes with torchrun")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    _timeout_s = timeout_min * 60
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    started = f" (torchrun restart {attempt})" if attempt not in (None, "0") else ""
    step = f"the process group's store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}{started}"
    with bounded(step, start_timeout_s, EXIT_START_TIMEOUT):
        try:
            store = _open_store(rank, world_size, start_timeout_s)
            store = _fresh_namespace(store, rank, world_size, started)
            step = f"every process to connect in init_process_group{started}"
            _watchdog.relabel(step)
            dist.init_process_group("nccl" if want_cuda else "gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(minutes=timeout_min))
            step = f"the first collective{started}"
            _watchdog.relabel(step)
            present = torch.ones(1, device=device)
            dist.all_reduce(present)
            counted = int(present.item())  # NCCL's collective runs asynchronously: read it inside the bound
        except RuntimeError as e:  # the store or the backend gave up before the bound (DistError is one too)
            raise StartFailed(f"{_who()}the process group did not start, waiting for {step}: {_first_line(e)}") from e
        if counted != world_size:
            raise StartFailed(f"{_who()}the first all-reduce counted {counted} processes, not {world_size}")
    return rank, world_size, device


def _open_store(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The TCPStore the workers rendezvous in: torchrun's agent's own (TORCHELASTIC_USE_AGENT_STORE, the default
    of its c10d rendezvous), or one that rank 0 serves at MASTER_ADDR:MASTER_PORT (as `env://` does)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    return dist.TCPStore(addr, int(port), world_size, is_master=rank == 0 and not agent,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False, multi_tenant=True)


def _fresh_namespace(store: dist.Store, rank: int, world_size: int, started: str = "") -> dist.Store:
    """A prefix of `store` that this start of the job alone uses, agreed by all its processes.

    torchrun's agent keeps its store across restarts (`--max-restarts`) and its keys carry no attempt, so a
    restarted group that used it as it is would read the previous attempt's addresses and connect to dead
    processes (seen: failures and hangs past an hour). TORCHELASTIC_RESTART_COUNT cannot name the attempt: each
    node's agent counts its own restarts, and a restart for a membership change counts on none, so nodes
    disagree. Instead rank 0 draws a random token each start and every other process acknowledges it: rank 0
    publishes `go` only when every rank has acknowledged this token, so a process that read a previous start's
    token (one whose `go` it has not acknowledged, or one that is already out) keeps reading until the new one
    appears. Every process of the previous start is dead before torchrun starts the next (it stops them first)."""
    base = f"fastpred/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
    token_key = base + "token"
    if rank == 0:
        token = secrets.token_hex(8)
        store.set(token_key, token)
        acks = [f"{base}{token}/ack/{r}" for r in range(1, world_size)]
        named = 0.0
        while acks and not store.check(acks):  # all or nothing, one request
            if time.monotonic() > named + 1:  # naming the missing ones costs a request each: once a second
                missing = [r for r in range(1, world_size) if not store.check([acks[r - 1]])]
                _watchdog.relabel(f"process(es) {_ranges(missing)} of {world_size} to join{started}")
                named = time.monotonic()
            time.sleep(_POLL_S)
        store.set(f"{base}{token}/go", "1")
        return dist.PrefixStore(f"{base}{token}/", store)
    _watchdog.relabel(f"process 0 to start the process group{started}")
    acked: set[str] = set()
    while True:
        if store.check([token_key]):
            token = store.get(token_key).decode()
            go = store.check([f"{base}{token}/go"])
            if token in acked and go:
                return dist.PrefixStore(f"{base}{token}/", store)
            if token not in acked and not go:  # a token already `go` without this process is a previous start's
                store.set(f"{base}{token}/ack/{rank}", "1")
                acked.add(token)
        time.sleep(_POLL_S)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _ranges(ranks: list[int]) -> str:
    """1, 3-5, 9: a short list of ranks."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        start = r if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(r) if r == start else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


#: What a failed collective's message says when the cause is another process (gloo's transport, c10d's errors).
_PEER_SIGNS = ("Timed out", "timed out", "pair closure", "Connection closed by peer", "Connection reset by peer",
               "Broken pipe", "gloo/transport")
_current_wait: list[str] = []  # what the innermost `waiting` block waits for


def peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that ended without another process (timed out, or the peer left), not a bug."""
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and active() and any(sign in str(e) for sign in _PEER_SIGNS)


def peer_lost(e: BaseException, what: str | None = None) -> PeerLost:
    """The one-line error for a failed collective: what it waited for (the innermost `waiting` block's, else
    `what`), the timeout, and the backend's own first line."""
    what = what or (_current_wait[-1] if _current_wait else "a collective with the other processes")
    return PeerLost(f"{_who()}gave up waiting for {what} (--dist-timeout {_timeout_s / 60:g} min): another process "
                    f"stopped answering or left ({_first_line(e)})")


@contextlib.contextmanager
def waiting(what: str, *, watchdog: bool = True) -> Iterator[None]:
    """A block of collectives that waits for the other processes: each collective is bounded by the group's
    timeout, and a failure becomes PeerLost, whose message names `what`. With `watchdog` the block as a whole is
    bounded too (the timeout + `_WATCHDOG_MARGIN_S`, should the backend not end a wait); leave it off around work
    that may rightly take longer (an evaluation: many collectives). Free in one process."""
    if not active() or dist.get_world_size() == 1:
        yield
        return
    _current_wait.append(what)
    entry = _watchdog.arm(what, _timeout_s + _WATCHDOG_MARGIN_S, EXIT_PEER_LOST) if watchdog else None
    try:
        yield
    except RuntimeError as e:
        if peer_failure(e):
            raise peer_lost(e, what) from e
        raise
    finally:
        if entry is not None:
            _watchdog.disarm(entry)
        _current_wait.pop()


def barrier(what: str = "the other processes at a barrier") -> None:
    if active():
        with waiting(what):
            dist.barrier()


def all_reduce_mean(grad: torch.Tensor) -> torch.Tensor:
    """A gradient hook: the mean of this gradient over all processes."""
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """x reduced over all processes in place (`op`: sum or max) and returned; x itself in one process."""
    if active() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's x (n_r, ...) concatenated along dim 0 in rank order, on every process; n_r may differ.

    Rows are padded to the largest n_r for the collective (gloo and NCCL gather equal shapes), then cut back."""
    if not active() or dist.get_world_size() == 1:
        return x
    sizes = torch.tensor([len(x)], device=x.device)
    gathered_sizes = [torch.empty_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered_sizes, sizes)
    counts = [int(n) for n in gathered_sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def teardown(exit_code: int = 0) -> None:
    """Destroys the process group, within TEARDOWN_TIMEOUT_S (NCCL's can hang when a peer is gone); past it the
    process ends with `exit_code`, the one it was ending with."""
    if active():
        with bounded("the process group's shutdown", TEARDOWN_TIMEOUT_S, exit_code):
            dist.destroy_process_group()
