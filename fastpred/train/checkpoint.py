"""The trainer's checkpoints: what one holds (`state_dict`), the checks before a run resumes from one
(`check_resumable`), restoring it (`load_state_dict`), and when and how the loop writes one (`CheckpointWriter`).

The format is `fastpred.train.run_dir.CHECKPOINT_FORMAT` (its keys are listed there), a dict of tensors and plain
values, written atomically by `RunDir.save_checkpoint`. A resumed run takes bitwise the same steps as one that never
stopped: the state holds every tensor the step depends on, including the buffers the state dicts leave out, the RNG
states and the schedule's position.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from fastpred.core import distributed
from fastpred.core.files import WriteError, writing
from fastpred.train.guard import all_finite, first_nonfinite, tensors_in
from fastpred.train.run_dir import CHECKPOINT_FORMAT, RunError, kept_name

if TYPE_CHECKING:
    from fastpred.train.loop import Trainer


def state_dict(trainer: Trainer) -> dict:
    t = trainer
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(t.cfg),
        "step": t.step, "epoch": t.epoch, "batch_in_epoch": t.batch_in_epoch,
        # What the schedule was computed with: a resume on another number of processes is checked against it.
        "world_size": t.world_size, "global_batch": t.global_batch, "steps_per_epoch": t.steps_per_epoch,
        "backbone": t.online.backbone.state_dict(), "projector": t.online.projector.state_dict(),
        "predictor": t.online.predictor.state_dict() if t.online.predictor is not None else {},
        "probe": t.probe.probe_state(), "optimizer": t.optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(t.device)} if t.cuda else {})},
        "spectrum": t.spectrum.state_dict(),
        "totals": {"train_time": t.train_time, "images_seen": t.images_seen},
    }
    if t.target is not None:
        state["target_backbone"] = t.target.backbone.state_dict()
        state["target_projector"] = t.target.projector.state_dict()
    state["transient_buffers"] = {name: transient_buffers(m) for name, m in _resumed_modules(t).items()}
    return state


def load_state_dict(trainer: Trainer, state: dict) -> None:
    """Restore `state` (checked first) into the trainer, its checkpoint writer and its divergence guard."""
    t = trainer
    check_resumable(t, state)
    t.online.backbone.load_state_dict(state["backbone"])
    t.online.projector.load_state_dict(state["projector"])
    if t.online.predictor is not None:
        t.online.predictor.load_state_dict(state["predictor"])
    if t.target is not None:
        t.target.backbone.load_state_dict(state["target_backbone"])
        t.target.projector.load_state_dict(state["target_projector"])
    for name, module in _resumed_modules(t).items():
        own = transient_buffers(module)
        for key, value in state.get("transient_buffers", {}).get(name, {}).items():
            if key in own:
                own[key].copy_(value)
    t.probe.load_probe_state(state["probe"])
    t.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if t.cuda and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], t.device)
    if t.rank == 0:
        t.spectrum.load_state_dict(state["spectrum"])
    t.step, t.epoch, t.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    t.train_time = state["totals"]["train_time"]
    t.images_seen = state["totals"]["images_seen"]
    t.run.truncate_metrics(t.step)
    t.checkpoints.saved_step = t.guard.checked_step = t.step
    t.checkpoints.last = (t.step, t.epoch)


def check_resumable(trainer: Trainer, state: dict) -> None:
    """The checkpoint's schedule is this run's: the same global batch (lr scaling, steps per epoch) and the same
    steps per epoch, whatever the number of processes. Checkpoints that predate these keys pass."""
    t = trainer
    saved_ws, saved_batch = state.get("world_size"), state.get("global_batch")
    if saved_batch is not None and saved_batch != t.global_batch:
        per = saved_batch // t.world_size
        keep = (f"or keep the global batch with --resume {t.run.path} --batch-size {per}"
                if saved_batch % t.world_size == 0 and per >= 2
                else f"({saved_batch} images do not split evenly over {t.world_size} processes)")
        raise RunError(
            f"the checkpoint was written by {saved_ws} process(es) with a global batch of {saved_batch}; this run "
            f"has {t.world_size} x {t.cfg.batch_size} = {t.global_batch} images per step, which would "
            f"change the learning rate, the steps per epoch and the whole schedule. Resume with {saved_ws} "
            f"process(es), {keep}")
    saved_steps = state.get("steps_per_epoch")
    if saved_steps is not None and saved_steps != t.steps_per_epoch:
        raise RunError(
            f"this run's data gives {t.steps_per_epoch} steps per epoch, the checkpoint's gave {saved_steps}: "
            f"the schedule would not match (other data, or {t.world_size} processes splitting it otherwise)")


def _resumed_modules(trainer: Trainer) -> dict[str, nn.Module]:
    return {"online": trainer.online, **({"target": trainer.target} if trainer.target is not None else {})}


def transient_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a module keeps out of its state_dict (persistent=False) that its numerics still depend on, such
    as SyncBatchNorm's variance shift: saved beside the state dicts (whose keys stay torchvision's), so that a
    resumed run rounds as the uninterrupted one did."""
    persistent = module.state_dict(keep_vars=True).keys()
    return {name: b for name, b in module.named_buffers() if name not in persistent}


class CheckpointWriter:
    """When the loop writes checkpoint.pt (every --checkpoint-every epochs, the last epoch, a --keep-every epoch, a
    stop, the end) and how: from rank 0, once the state is found finite, with checkpoint-epochNNNN.pt kept at
    --keep-every epochs; every process learns the outcome."""

    def __init__(self, run, *, rank: int, world_size: int, device: torch.device, checkpoint_every: int,
                 keep_every: int, epochs: int):
        self.run, self.rank, self.world_size, self.device = run, rank, world_size, device
        self.checkpoint_every, self.keep_every, self.epochs = checkpoint_every, keep_every, epochs
        self.saved_step = -1  # the step of the checkpoint on disk (written or resumed from)
        self.last: tuple[int, int] | None = None  # (step, epoch) of the last good checkpoint

    def due(self, epoch: int) -> bool:
        """Whether the end of `epoch` (epochs done) writes a checkpoint."""
        return (epoch % self.checkpoint_every == 0 or epoch == self.epochs
                or bool(self.keep_every and epoch % self.keep_every == 0))

    def save(self, trainer: Trainer) -> None:
        """checkpoint.pt from rank 0, once the state is found finite on the device (one fused reduction, read once:
        the write waits for the device anyway), and checkpoint-epochNNNN.pt at --keep-every epochs. Every process
        learns the outcome, so that all end the same way when the state is non-finite or the write fails."""
        t = trainer
        keep = self.keep_every and t.batch_in_epoch == 0 and t.epoch % self.keep_every == 0
        fresh = t.step != self.saved_step  # the end of training and a stop may follow the epoch's checkpoint
        state = state_dict(t) if fresh else None
        if fresh:
            bad = (~all_finite(tensors_in(state), self.device)).float().reshape(1)
            if self.world_size > 1:
                with distributed.waiting(f"the other processes' check of the state to checkpoint at step {t.step}"):
                    dist.all_reduce(bad)
            if bad.item():
                t.guard.diverged(f"non-finite values in the state to checkpoint at step {t.step} (first: "
                                 f"{first_nonfinite(state) or 'on another process'}); nothing was written",
                                 t.step, self.last)
        failed = None
        if self.rank == 0:
            try:
                if fresh:
                    self.run.save_checkpoint(state)
                    if t.spectrum.every:
                        with writing(self.run.path / "spectrum.npz"):
                            t.spectrum.save(self.run.path / "spectrum.npz")
                if keep and (fresh or not (self.run.path / kept_name(t.epoch)).exists()):
                    self.run.keep_checkpoint(t.epoch)
            except WriteError as e:
                failed = e
        status = torch.tensor([float(failed is not None)], device=self.device)
        if self.world_size > 1:
            with distributed.waiting(f"process 0's checkpoint write at step {t.step}"):
                dist.all_reduce(status)  # also the barrier: no process runs ahead of the write
        if status.item():
            raise failed or WriteError("process 0 could not write the checkpoint")
        self.saved_step = t.step
        self.last = (t.step, t.epoch)
