"""The run folder: everything needed to read, reproduce and resume a run.

    RUN_DIR/config.json      every resolved setting (`python -m fastpred.train --resume RUN_DIR` reads it)
    RUN_DIR/env.json         versions, device, world size, git commit, command line
    RUN_DIR/metrics.jsonl    one JSON object per log interval ("kind": "train") and per evaluation ("eval")
    RUN_DIR/spectrum.npz     eigenvalues of F and W over training (fastpred.train.spectrum)
    RUN_DIR/checkpoint.pt    the latest checkpoint (format below), replaced atomically
    RUN_DIR/summary.json     final probe accuracies, health and speed

Checkpoint format (`CHECKPOINT_FORMAT`), a dict of tensors and plain values only, so it loads with
`torch.load(path, weights_only=True)`: a folder someone sends runs no code. Keys: format, config, step
(optimizer steps done), epoch (epochs done), batch_in_epoch (batches of the current epoch done), backbone,
projector, predictor, target_backbone, target_projector (state dicts; the targets are absent for SimSiam), probe,
optimizer, rng, spectrum, totals, wall_time_s. `backbone` loads into the torchvision model it names with
`fc = nn.Identity()` (`resnet18_small`: also conv1 = 3x3 stride 1 and maxpool = Identity).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from fastpred.train.distributed import barrier

CHECKPOINT_FORMAT = "fastpred-checkpoint-1"
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.jsonl")


class RunError(ValueError):
    """A run folder that cannot be used as asked; the CLI prints it as one line."""


def default_folder(preset: str) -> Path:
    return Path("runs") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{preset}"


def holds_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file in the same folder, synced and renamed over
    `path` once the block succeeds (readers see the old or the new file, never half of one), removed if not."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


class RunDir:
    def __init__(self, path: str | os.PathLike, *, writer: bool):
        self.path = Path(path)
        self.writer = writer  # only rank 0 writes

    @classmethod
    def create(cls, path: str | os.PathLike, *, writer: bool) -> RunDir:
        """A new run's folder: refused if it holds a run. Nothing is written until `start`."""
        run = cls(path, writer=writer)
        if run.path.exists() and not run.path.is_dir():
            raise RunError(f"--out {run.path} exists and is not a folder")
        if holds_run(run.path):
            raise RunError(f"--out {run.path} already holds a run; resume it with --resume {run.path} "
                           "or choose another folder")
        barrier()  # every rank has looked before rank 0 writes
        return run

    def start(self, config_json: str, env: dict) -> None:
        """Write config.json and env.json (once the run has been built: a run that cannot start leaves nothing)."""
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path / "config.json", config_json.encode())
            atomic_write(self.path / "env.json", json.dumps(env, indent=2).encode())

    @classmethod
    def open(cls, path: str | os.PathLike, *, writer: bool) -> RunDir:
        run = cls(path, writer=writer)
        if not run.path.is_dir():
            raise RunError(f"--resume {run.path}: no such folder")
        for name in ("config.json", "checkpoint.pt"):
            if not (run.path / name).is_file():
                raise RunError(f"--resume {run.path}: no run to resume there (no {name})")
        return run

    def read_config(self) -> str:
        return (self.path / "config.json").read_text()

    # --- metrics
    def append_metrics(self, record: dict) -> None:
        if self.writer:
            with open(self.path / "metrics.jsonl", "a") as f:
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
    def save_checkpoint(self, state: dict) -> None:
        if self.writer:
            with atomic_file(self.path / "checkpoint.pt") as f:
                torch.save(state, f)

    def load_checkpoint(self) -> dict:
        path = self.path / "checkpoint.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling raises many types for a damaged or foreign file
            raise RunError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
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
        with contextlib.suppress(Exception):
            env[name] = __import__(name).__version__
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
