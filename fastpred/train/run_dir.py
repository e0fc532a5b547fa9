"""The run folder: everything needed to read, reproduce and resume a run.

    RUN_DIR/config.json      every resolved setting (`python -m fastpred.train --resume RUN_DIR` reads it)
    RUN_DIR/env.json         versions, device, world size, git commit, command line
    RUN_DIR/events.jsonl     one line per start, resume (with any setting changed on purpose), stop, divergence
    RUN_DIR/metrics.jsonl    one JSON object per log interval ("kind": "train") and per evaluation ("eval")
    RUN_DIR/spectrum.npz     eigenvalues of F and W over training (fastpred.train.spectrum)
    RUN_DIR/checkpoint.pt    the latest checkpoint (format below), replaced atomically
    RUN_DIR/checkpoint-epochNNNN.pt  the checkpoints kept every --keep-every epochs
    RUN_DIR/summary.json     final probe accuracies, health and speed

Checkpoint format (`CHECKPOINT_FORMAT`), a dict of tensors and plain values only, so it loads with
`torch.load(path, weights_only=True)`: a folder someone sends runs no code. Keys: format, config, step
(optimizer steps done), epoch (epochs done), batch_in_epoch (batches of the current epoch done), world_size,
global_batch, steps_per_epoch (what the schedule was computed with), backbone, projector, predictor,
target_backbone, target_projector (state dicts; the targets are absent for SimSiam), transient_buffers (buffers
the state dicts leave out, by module), probe, optimizer, rng, spectrum, totals. `backbone` loads into the
torchvision model it names with `fc = nn.Identity()` (`resnet18_small`: also conv1 = 3x3 stride 1 and maxpool =
Identity). No checkpoint holds a non-finite value: the trainer checks the state before it writes one.

Every write goes through `atomic_file` (`fastpred.core.files`) or appends a line, so a crash, a kill or a full disk
leaves the previous file whole; a failed write is one `WriteError` naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import torch

from fastpred.core.distributed import barrier
from fastpred.core.files import atomic_file, atomic_write, load_data, writing

CHECKPOINT_FORMAT = "fastpred-checkpoint-1"
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.jsonl")


class RunError(ValueError):
    """A run folder that cannot be used as asked; the CLI prints it as one line (exit code 2)."""


class Diverged(RuntimeError):
    """Training produced non-finite losses or parameters; the CLI prints the message as one line (exit code 3)."""


def default_folder(preset: str) -> Path:
    return Path("runs") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{preset}"


def holds_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def kept_name(epoch: int) -> str:
    return f"checkpoint-epoch{epoch:04d}.pt"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _WriteRecorder:
    """A file wrapper that remembers the OSError of a failed write: torch.save reports a full disk as a
    RuntimeError ("unexpected pos ...") and loses the reason."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


class RunDir:
    def __init__(self, path: str | os.PathLike, *, writer: bool):
        self.path = Path(path)
        self.writer = writer  # only rank 0 writes

    @classmethod
    def create(cls, path: str | os.PathLike, *, writer: bool) -> RunDir:
        """A new run's folder: refused if it holds a run or cannot be written. Nothing is written until `start`."""
        run = cls(path, writer=writer)
        if run.path.exists() and not run.path.is_dir():
            raise RunError(f"--out {run.path} exists and is not a folder")
        if holds_run(run.path):
            raise RunError(f"--out {run.path} already holds a run; resume it with --resume {run.path} "
                           "(or the same command with --auto-resume) or choose another folder")
        run.check_writable("--out")
        barrier("the other processes' look at the run folder")  # every rank has looked before rank 0 writes
        return run

    def check_writable(self, flag: str) -> None:
        """Refuse, before anything is built, a folder this process could not write (found only at the first
        checkpoint otherwise)."""
        if not self.writer:
            return
        existing = next(p for p in (self.path, *self.path.resolve().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise RunError(f"{flag} {self.path}: cannot write in {existing} (permission denied)")

    def start(self, config_json: str, env: dict, *, event: str = "start") -> None:
        """Write config.json and env.json (once the run has been built: a run that cannot start leaves nothing)."""
        if self.writer:
            with writing(self.path / "config.json"):
                self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path / "config.json", config_json.encode())
            atomic_write(self.path / "env.json", json.dumps(env, indent=2).encode())
            self.record_event(event, step=0, world_size=env.get("world_size"), argv=env.get("argv"))

    @classmethod
    def open(cls, path: str | os.PathLike, *, writer: bool) -> RunDir:
        run = cls(path, writer=writer)
        if not run.path.is_dir():
            raise RunError(f"--resume {run.path}: no such folder")
        for name in ("config.json", "checkpoint.pt"):
            if not (run.path / name).is_file():
                raise RunError(f"--resume {run.path}: no run to resume there (no {name})")
        run.check_writable("--resume")
        return run

    def read_config(self) -> str:
        return (self.path / "config.json").read_text()

    def rewrite_config(self, config_json: str) -> None:
        """config.json after a resume that changed a setting on purpose (the change is in events.jsonl)."""
        if self.writer:
            atomic_write(self.path / "config.json", config_json.encode())

    # --- events: what happened to the run, never truncated
    def record_event(self, event: str, **fields) -> None:
        if self.writer:
            self._append("events.jsonl", {"event": event, "time": now(), **fields})

    def events(self) -> list[dict]:
        path = self.path / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                out.append(json.loads(line))
        return out

    def divergence(self) -> dict | None:
        """The divergence this run ended with, if nothing (a start or a resume) came after it."""
        last = [e for e in self.events() if e.get("event") in ("start", "restart", "resume", "diverged")]
        return last[-1] if last and last[-1]["event"] == "diverged" else None

    def finished(self, epochs: int, max_steps: int) -> dict | None:
        """summary.json if it reports the end a run with these settings trains to, else None."""
        path = self.path / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        done = summary.get("epochs", 0) >= epochs - 1e-9 or (max_steps and summary.get("steps", 0) >= max_steps)
        return summary if done else None

    # --- metrics
    def append_metrics(self, record: dict) -> None:
        if self.writer:
            self._append("metrics.jsonl", record)

    def _append(self, name: str, record: dict) -> None:
        with writing(self.path / name), open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop lines logged after the checkpoint a run resumes from (they will be logged again)."""
        path = self.path / "metrics.jsonl"
        if not (self.writer and path.exists()):
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the stop
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write(path, "".join(f"{line}\n" for line in kept).encode())

    # --- checkpoints
    def save_checkpoint(self, state: dict) -> Path:
        path = self.path / "checkpoint.pt"
        if self.writer:
            with writing(path, "; the previous checkpoint.pt is intact"), atomic_file(path) as f:
                recorder = _WriteRecorder(f)
                try:
                    torch.save(state, recorder)
                except RuntimeError:
                    if recorder.error is not None:
                        raise recorder.error from None
                    raise
        return path

    def keep_checkpoint(self, epoch: int) -> Path:
        """checkpoint.pt, just written, also as checkpoint-epochNNNN.pt: a hard link (no copy, no extra space
        until checkpoint.pt is replaced), or a copy where links are not supported; atomic either way."""
        src, dst = self.path / "checkpoint.pt", self.path / kept_name(epoch)
        if self.writer:
            with writing(dst):
                tmp = self.path / f".{dst.name}.link.tmp"
                try:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    os.link(src, tmp)
                    os.replace(tmp, dst)
                except OSError:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    with open(src, "rb") as fin, atomic_file(dst) as fout:
                        while chunk := fin.read(1 << 24):
                            fout.write(chunk)
        return dst

    def load_checkpoint(self) -> dict:
        path = self.path / "checkpoint.pt"
        state = load_data(path, RunError, "checkpoint ")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"{path} is not a fastpred checkpoint ({CHECKPOINT_FORMAT})")
        return state

    def write_summary(self, summary: dict) -> None:
        if self.writer:
            atomic_write(self.path / "summary.json", json.dumps(summary, indent=2).encode())


def environment(device: torch.device, world_size: int) -> dict:
    """What env.json records: enough to tell two runs' software and hardware apart."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
        "argv": sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for name in ("triton", "ffcv", "numpy", "torchvision"):
        # From the installed package's metadata unless already imported: importing FFCV (numba) takes ~9 s.
        with contextlib.suppress(Exception):
            env[name] = getattr(sys.modules.get(name), "__version__", None) or importlib.metadata.version(name)
    repo = Path(__file__).resolve().parents[2]
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode == 0:
            env["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            env["git_dirty"] = bool(dirty.stdout.strip())
    return env
