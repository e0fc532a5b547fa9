"""The training loop: epochs of steps over the training views, with what happens at its edges: every log interval
(one read of the device's accumulators: metrics, the divergence guard, stop requests), every epoch's end (the kNN
monitor, the checkpoint), and the end of training (the final evaluation and the summary).

`Trainer` is the run: a `Learner` (`step.py`: the networks, the optimizer and the step itself) fed by the run's
data (`data.py`), with one object per concern at the edges: the divergence guard (`guard.py`), stop requests
(`stops.py`), checkpoints and resumes (`checkpoint.py`), the evaluation calendar (`evaluation.py`) and the logs
(`logs.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time

import torch
import torch.distributed as dist

from fastpred import threads
from fastpred.core import distributed
from fastpred.data.named import NAMED_SOURCES
from fastpred.train import data as train_data
from fastpred.train.checkpoint import CheckpointWriter, load_state_dict, state_dict
from fastpred.train.config import Config
from fastpred.train.evaluation import EvalCalendar
from fastpred.train.guard import DivergenceGuard, all_finite
from fastpred.train.logs import RunLog, compile_counts
from fastpred.train.run_dir import RunDir
from fastpred.train.step import HEALTH, Learner
from fastpred.train.stops import Stopped, StopRequests

__all__ = ["Stopped", "Trainer"]


class Trainer(Learner):
    """One process's part of a run: its data, its `Learner`, and the objects at the loop's edges. Build it, load a
    checkpoint into it (`load_state_dict`) to continue a run, then `fit`."""

    def __init__(self, cfg: Config, run: RunDir, *, rank: int, world_size: int, device: torch.device):
        self.cfg, self.run = cfg, run
        # Each process takes its share of the node's cores, for FFCV's decoders and for torch, set on purpose here.
        self.threads = threads.plan(cfg.workers, cfg.threads)
        torch.set_num_threads(self.threads.torch_threads)
        self.sources = train_data.Sources(dataclasses.replace(cfg, workers=self.threads.workers), rank=rank,
                                          world_size=world_size, device=device)
        # Again: FFCV, imported above to read the .beton, sets torch's count to 1 at import (fastpred's own imports
        # of it put the count back; this holds whatever imported it first).
        torch.set_num_threads(self.threads.torch_threads)
        super().__init__(cfg, rank=rank, world_size=world_size, device=device, num_classes=self._num_classes(),
                         steps_per_epoch=len(self.sources.train_views))
        self.epoch = 0
        self.train_time = 0.0  # seconds in training steps (evaluation and checkpoints excluded)
        self.images_seen = 0  # source images (two views each), all ranks
        self.guard = DivergenceGuard(run, rank=rank, limit=cfg.max_nonfinite_steps, lr=cfg.lr, device=device)
        self.stops = StopRequests(run, rank=rank, world_size=world_size, device=device, within_s=cfg.stop_within)
        self._save_s = 0.0  # seconds the last checkpoint took (its write and the barrier), for the stop plan
        self.checkpoints = CheckpointWriter(run, rank=rank, world_size=world_size, device=device,
                                            checkpoint_every=cfg.checkpoint_every, keep_every=cfg.keep_every,
                                            epochs=cfg.epochs)
        self.evaluations = EvalCalendar(cfg, self.sources, device=device, amp=self.amp,
                                        channels_last=self.channels_last, feat_dim=self.probe.feat_dim)
        self.log = RunLog(cfg, run, rank=rank, spectrum=self.spectrum, total_steps=self.total_steps)

    def _num_classes(self) -> int:
        if self.cfg.data == "synthetic":
            return train_data.SYNTHETIC_CLASSES
        if self.cfg.data in NAMED_SOURCES:
            return NAMED_SOURCES[self.cfg.data].classes
        return self.sources.probes.num_classes["train"]  # read with the probes' labels: the file is opened once

    def state_dict(self) -> dict:
        """The checkpoint of this trainer (`fastpred.train.checkpoint`)."""
        return state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint, checked against this run first (`fastpred.train.checkpoint`)."""
        load_state_dict(self, state)

    # --- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end (or --max-steps) and evaluate; the summary. Raises Stopped after a stop request's
        checkpoint, Diverged, or WriteError."""
        with self.stops.handling():
            self.log.open(self.step)
            try:
                return self._fit()
            finally:
                self.log.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        self.log.start_progress(self.step)
        views = self.sources.train_views
        start = time.perf_counter()
        last_log_images, last_log_time, last_log_step = self.images_seen, self.train_time, self.step
        # Host seconds the interval's steps waited for their batch: the loader's next() (FFCV's queue and the copy),
        # or the resident views' construction (on the CPU, the crops themselves). perf_counter only, no device sync:
        # on CUDA it is the host's wait, which overlaps the device's work still queued.
        data_wait = 0.0
        self.guard.start()
        while self.epoch < cfg.epochs and not self._done():
            views.set_epoch(self.epoch, self.batch_in_epoch)
            t0 = ready = time.perf_counter()
            for x1, x2, y in views:
                data_wait += time.perf_counter() - ready
                self.train_step(x1, x2, y)
                self.guard.after_step(self.health_count("nonfinite_loss"))
                self.images_seen += self.global_batch
                stop_here = self.stops.requested and self.world_size == 1
                epoch_end = self.batch_in_epoch == self.steps_per_epoch
                log_due = self.step % cfg.log_every == 0 or epoch_end or self._done()
                if not log_due and self.stops.check_due(self.step):  # under torchrun, between log intervals
                    stop_here = self.stops.agreed(self.step)
                if log_due or stop_here:
                    values = self._read_accumulators(time.perf_counter() - t0, data_wait)  # waits for the device
                    self.train_time += time.perf_counter() - t0
                    record = self._interval_record(values)
                    interval = self.train_time - last_log_time
                    record["images_per_sec"] = (self.images_seen - last_log_images) / max(interval, 1e-9)
                    # The processes' mean wait over the interval's wall time (the same on every process: the
                    # accumulators' read ends every interval together).
                    record["data_wait_share"] = values["data_wait_s"] / self.world_size / max(interval, 1e-9)
                    data_wait = 0.0
                    self.stops.plan(values["interval_s"] / self.world_size / max(self.step - last_log_step, 1),
                                    values["save_s"] / self.world_size, cfg.log_every)
                    last_log_images, last_log_time, last_log_step = self.images_seen, self.train_time, self.step
                    self.log.interval(record)
                    # Before this state reaches any checkpoint.
                    self.guard.check(values, self.step, self.checkpoints.last)
                    stop_here = record.pop("stop_requested") or stop_here
                    if epoch_end:  # the epoch's checkpoint before any stop: resumes start clean
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                        self._end_of_epoch(monitor=not stop_here)  # a stop does not wait for the kNN monitor
                    if stop_here:
                        self.log.end_progress()
                        self._save_checkpoint()
                        self.stops.stop(self.step, self.epoch)
                    t0 = time.perf_counter()  # evaluation and checkpoints are not training time
                if self._done():
                    break
                ready = time.perf_counter()
        self.log.end_progress()
        self._save_checkpoint()  # skipped when the last epoch's has just been written
        # A request that came after the last interval's check must not wait for the final evaluation.
        if self.stops.agreed(self.step) if self.world_size > 1 else self.stops.requested:
            self.stops.stop(self.step, self.epoch)
        self.stops.enter_final_phase(self.step)
        return self._finish(time.perf_counter() - start)

    def _done(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _read_accumulators(self, interval_s: float, data_wait_s: float = 0.0) -> dict[str, float]:
        acc = self._acc
        if self.stops.requested:
            acc[HEALTH.index("stop")] = 1.0
        # Whether a parameter or buffer is non-finite rides along: one fused reduction, read with the rest. So do
        # this process's seconds of training in the interval, of its last checkpoint and of waiting for data:
        # summed, every process plans its stop checks from the same numbers.
        modules = [self.online] if self.target is None else [self.online, self.target]
        finite = all_finite(itertools.chain.from_iterable(
            itertools.chain(m.parameters(), m.buffers()) for m in modules), self.device)
        times = torch.tensor([interval_s, self._save_s, data_wait_s], dtype=acc.dtype, device=acc.device)
        packed = torch.cat([acc, (~finite).to(acc.dtype).reshape(1), times])
        if self.world_size > 1:
            with distributed.waiting(f"the other processes at the log interval of step {self.step}"):
                dist.all_reduce(packed)  # sums over ranks; also how every rank learns that one was asked to stop
        values = dict(zip((*HEALTH, "nonfinite_model", "interval_s", "save_s", "data_wait_s"), packed.tolist(),
                          strict=True))
        values["nonfinite_run"] = self.guard.read_run(values["nonfinite_loss"], self.world_size)
        self._acc = torch.zeros_like(acc)
        return values

    def _interval_record(self, values: dict[str, float]) -> dict:
        ranks_steps = max(values["steps"], 1.0)
        finite_steps = max(values["steps"] - values["nonfinite_loss"], 1.0)
        if values["nonfinite_loss"]:
            print(f"warning: {int(values['nonfinite_loss'])} non-finite loss value(s) in the steps up to "
                  f"{self.step}", file=sys.stderr, flush=True)
        pred = self.online.predictor
        record = {
            "kind": "train", "step": self.step, "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
            "loss": values["loss"] / finite_steps, "lr": self.optimizer.param_groups[0]["lr"],
            "pred_lr": next((g["lr"] for g in self.optimizer.param_groups if g.get("predictor")), None),
            "online_probe_acc": values["probe_correct"] / values["probe_counted"] if values["probe_counted"] else None,
            "output_std": values["output_std"] / ranks_steps,
            "nonfinite_losses": int(values["nonfinite_loss"]),
            "skipped_updates": int(pred.skipped_updates) if hasattr(pred, "skipped_updates") else None,
            "unconverged_solves": int(pred.unconverged_solves) if hasattr(pred, "unconverged_solves") else None,
            "time_s": self.train_time,
            "stop_requested": values["stop"] > 0,
        }
        if self.target is not None:
            record["target_ema"] = self.target_momentum()
        record.update({k: self._last_health.get(k) for k in ("effective_rank", "f_eig_max", "f_eig_min")})
        if self.cfg.compile:
            record.update(compile_counts())
        return record

    def _end_of_epoch(self, monitor: bool = True) -> None:
        if monitor and self.evaluations.monitor_due(self.epoch):
            last = self.epoch == self.cfg.epochs or self._done()
            with distributed.waiting(f"the other processes in the kNN monitor of epoch {self.epoch}", watchdog=False):
                knn = self.evaluations.monitor(self.online.backbone, self.step, last=last)
            self.log.append({"kind": "eval", "step": self.step, "epoch": float(self.epoch), "knn_acc": knn})
            if knn is not None:
                self.log.say(f"epoch {self.epoch}: kNN accuracy on the held-out set {knn:.4f}")
        if self.checkpoints.due(self.epoch):
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        fresh, started = self.checkpoints.saved_step != self.step, time.perf_counter()
        self.checkpoints.save(self)
        if fresh:  # a write, not the skip of a step already saved
            self._save_s = time.perf_counter() - started

    def _finish(self, wall: float) -> dict:
        last = self.log.last_train_record()
        summary = {
            "steps": self.step, "epochs": self.step / self.steps_per_epoch, "train_time_s": self.train_time,
            "wall_time_s": wall, "images_per_sec": self.images_seen / max(self.train_time, 1e-9),
            "output_std": last.get("output_std"), "effective_rank": self._last_health.get("effective_rank"),
            **self._final_evaluation(),
            "held_out": self.sources.held_out_note,
        }
        self.log.summary(summary, self.step)
        return summary

    def _final_evaluation(self) -> dict:
        with distributed.waiting("the other processes in the final evaluation", watchdog=False):
            return self.evaluations.final(self.online.backbone, self.step)
