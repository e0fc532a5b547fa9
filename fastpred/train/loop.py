"""The training loop: data, both views through the network in one call, loss, backward, optimizer, target EMA,
metrics. Everything around it (config, models, optimizers, data, probes, spectra, the run folder) is imported.

Nothing inside a step waits on the host: losses, probe counts and health measures accumulate on the device and
are read once per log interval (the spectrum recorder reads its own, on its record steps only).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import nn

from fastpred import threads
from fastpred.core import distributed
from fastpred.core.files import WriteError, writing
from fastpred.core.models import build_backbone, build_predictor, build_projector
from fastpred.data.augment import BYOLAugment
from fastpred.eval import extract_features, knn_accuracy, linear_probe_accuracy
from fastpred.train import data as train_data
from fastpred.train.config import Config
from fastpred.train.optim import (
    build_optimizer,
    ema_update_,
    group_lr,
    lr_at,
    param_groups,
    symmetrize_,
    target_momentum_at,
    with_predictor_group,
)
from fastpred.train.probes import OnlineProbe
from fastpred.train.run_dir import CHECKPOINT_FORMAT, Diverged, RunDir, RunError, kept_name
from fastpred.train.spectrum import SpectrumRecorder
from fastpred.train.sync_bn import convert_sync_batchnorm
from fastpred.train.tensorboard import TensorBoardLog

# The accumulators read once per log interval, in this order (one device vector, one host read).
_ACC = ("loss", "probe_correct", "probe_counted", "output_std", "nonfinite_loss", "steps", "stop")


class Online(nn.Module):
    """backbone -> projector -> predictor; returns the features h, the projections z and the predictions p."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.backbone(x)  # (2B, feat)
        z = self.projector(h)  # (2B, d)
        return h, z, z if self.predictor is None else self.predictor(z)


def ssl_loss(p: torch.Tensor, t: torch.Tensor, method: str) -> torch.Tensor:
    """Symmetric loss on l2-normalised outputs; rows are [view 1; view 2] and each view predicts the other's
    target. BYOL: 2 - 2 cos (the mean of its two directions); SimSiam: -cos. In fp32 whatever the autocast."""
    p = nnf.normalize(p.float(), dim=1)
    t = nnf.normalize(torch.cat(t.float().chunk(2)[::-1]), dim=1)
    cos = (p * t).sum(dim=1)
    return (2 - 2 * cos).mean() if method == "byol" else -cos.mean()


def output_std(z: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse measure: std over the batch of the l2-normalised outputs, averaged over features,
    times sqrt(d): about 1 for well-spread outputs, 0 for collapsed ones."""
    return nnf.normalize(z.float(), dim=1).std(dim=0).mean() * math.sqrt(z.shape[1])


def compile_counts() -> dict[str, int]:
    """torch.compile's graphs and graph breaks so far in this process: a graph break runs its code eagerly between
    compiled pieces (with DDP, also a bucket boundary), so the step is fully compiled only while breaks stay 0."""
    from torch._dynamo.utils import counters

    return {"compile_graphs": int(counters["stats"]["unique_graphs"]),
            "compile_graph_breaks": int(sum(counters["graph_break"].values()))}


def backbone_at_init(cfg: Config) -> tuple[nn.Module, int]:
    """The backbone exactly as a run with this seed starts (the random-init baseline of the final probe), and
    its feature width."""
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.backbone)


class Trainer:
    def __init__(self, cfg: Config, run: RunDir, *, rank: int, world_size: int, device: torch.device):
        self.cfg, self.run, self.rank, self.world_size, self.device = cfg, run, rank, world_size, device
        self.cuda = device.type == "cuda"
        # bf16 autocast and channels-last: on CUDA, or on the CPU to rehearse the CUDA step (CPU autocast follows
        # CUDA's op policy, so what would fail in bf16 on a GPU fails here too).
        self.amp = cfg.amp and (self.cuda or cfg.cuda_rehearsal)
        self.channels_last = cfg.channels_last and (self.cuda or cfg.cuda_rehearsal)
        # Each process takes its share of the node's cores, for FFCV's decoders and for torch, set on purpose here.
        self.threads = threads.plan(cfg.workers, cfg.threads)
        torch.set_num_threads(self.threads.torch_threads)
        self.sources = train_data.Sources(dataclasses.replace(cfg, workers=self.threads.workers), rank=rank,
                                          world_size=world_size, device=device)
        self.steps_per_epoch = len(self.sources.train_views)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.global_batch = cfg.batch_size * world_size

        backbone, feat_dim = backbone_at_init(cfg)
        torch.manual_seed(cfg.seed + 1)
        projector = build_projector(feat_dim, cfg.proj_hidden, cfg.proj_dim)
        predictor = build_predictor(
            cfg.predictor, cfg.proj_dim, rho=cfg.rho, eps=cfg.eps, freq=cfg.freq, groups=cfg.groups,
            backend=cfg.backend, sweeps=cfg.sweeps, trainable=cfg.trainable, hidden=cfg.pred_hidden, alpha=cfg.alpha,
        )
        online = Online(backbone, projector, predictor)
        if world_size > 1 and cfg.sync_bn:
            # Batch statistics over the global batch, in one all-reduce per layer and no host wait (CUDA and gloo).
            # The target below is a copy, so its BatchNorm is synchronised too, as in BYOL: online and target then
            # normalise the same images with the same statistics, whatever the split over processes.
            online = convert_sync_batchnorm(online)
        self.online = online.to(device)
        if self.channels_last:
            self.online.to(memory_format=torch.channels_last)
        self.target = None
        if cfg.method == "byol":
            self.target = copy.deepcopy(nn.ModuleDict({"backbone": self.online.backbone,
                                                       "projector": self.online.projector}))
            self.target.requires_grad_(False)
            self._target_params = list(self.target.parameters())
            self._online_params = [*self.online.backbone.parameters(), *self.online.projector.parameters()]
        self.probe = OnlineProbe(feat_dim, self._num_classes(), lr=cfg.probe_lr, device=device)
        if world_size > 1:
            for p in self.probe.parameters():  # every rank's probe takes the same averaged step
                p.register_hook(distributed.all_reduce_mean)

        lr_scale = self.global_batch / 256 if cfg.lr_scaling == "linear" else 1.0
        base_lr = cfg.lr * lr_scale
        self.base_lr = base_lr
        if cfg.own_predictor_optimizer:  # the official DirectPred code's separate predictor optimizer settings
            groups = with_predictor_group(
                [self.online.backbone, self.online.projector], self.online.predictor, weight_decay=cfg.weight_decay,
                exclude_bias_and_norm=cfg.exclude_bias_norm, base_lr=base_lr,
                pred_base_lr=(cfg.pred_lr if cfg.pred_lr is not None else cfg.lr) * lr_scale,
                pred_weight_decay=cfg.weight_decay if cfg.pred_wd is None else cfg.pred_wd,
                pred_lr_fixed=cfg.pred_lr_fixed,
            )
        else:
            groups = param_groups([self.online], cfg.weight_decay, exclude_bias_and_norm=cfg.exclude_bias_norm)
        self.optimizer = build_optimizer(cfg.optimizer, groups, lr=base_lr, momentum=cfg.momentum)
        self.augment = BYOLAugment()
        self._augment_rng = torch.Generator(device)  # re-seeded every step (host-side: no synchronisation)
        self.spectrum = SpectrumRecorder(cfg.proj_dim, every=cfg.spectrum_every if rank == 0 else 0)

        self.model = self.online
        if world_size > 1:
            # Buffers are not broadcast: DirectPredictor's F and W are already equal on every rank (global
            # statistics), and broadcasting them each step would cost d^2 per buffer for nothing.
            self.model = nn.parallel.DistributedDataParallel(
                self.online, device_ids=[device.index] if self.cuda else None, broadcast_buffers=False
            )
        if cfg.compile:
            self.compile_modules()

        self.step = self.epoch = self.batch_in_epoch = 0
        self.train_time = 0.0  # seconds in training steps (evaluation and checkpoints excluded)
        self.images_seen = 0  # source images (two views each), all ranks
        self.stop_signal: int | None = None
        self._last_health: dict = {}
        self._acc = torch.zeros(len(_ACC), device=device)
        self.tensorboard: TensorBoardLog | None = None  # opened by fit() on rank 0 with --tensorboard
        self._spectrum_logged = 0  # spectrum records already in TensorBoard

    def compile_modules(self, **options) -> None:
        """torch.compile the backbones and projectors module by module (state-dict keys unchanged); the predictor
        stays eager: its refresh is a few small kernels with host-side control flow."""
        modules = [self.online.backbone, self.online.projector]
        if self.target is not None:
            modules += [self.target.backbone, self.target.projector]
        for module in modules:
            module.compile(**options)

    def _num_classes(self) -> int:
        if self.cfg.data == "synthetic":
            return train_data.SYNTHETIC_CLASSES
        if self.cfg.data in train_data.NAMED_SOURCES:
            return train_data.NAMED_SOURCES[self.cfg.data].classes
        return train_data.label_count(self.cfg.data)

    # --- the step ------------------------------------------------------------------------------------------
    def train_step(self, x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> None:
        cfg = self.cfg
        # Augmentation parameters from a generator seeded per step: a resumed run draws the same ones.
        g = self._augment_rng
        g.manual_seed(hash((cfg.seed, self.rank, self.step)) & 0x7FFF_FFFF_FFFF_FFFF)
        v1 = self.augment.view1(x1, self.augment.view1.sample(len(x1), self.device, generator=g))
        v2 = self.augment.view2(x2, self.augment.view2.sample(len(x2), self.device, generator=g))
        self.optimize(v1, v2, y)

    def optimize(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor) -> None:
        """The step on augmented views v1, v2 (B, 3, H, W) float and labels y (B,): what bench/ times."""
        cfg = self.cfg
        lr = lr_at(self.step, total_steps=self.total_steps, warmup_steps=self._warmup_steps(), base_lr=self.base_lr,
                   schedule=cfg.schedule)
        for group in self.optimizer.param_groups:  # host floats: setting them is not a sync
            group["lr"] = group_lr(group, lr)
        x = torch.cat([v1, v2])  # both views through the network in one call, as DirectPred's statistics expect
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            h, z, p = self.model(x)
            if self.target is not None:
                with torch.no_grad():
                    t = self.target.projector(self.target.backbone(x))
            else:
                t = z.detach()  # SimSiam: the other view's projection, stop-gradient
        loss = ssl_loss(p, t, cfg.method)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if cfg.pred_reg == "symmetric":  # the official code's default for its linear head: W <- (W + W^T) / 2
            symmetrize_(self.online.predictor.linear.weight)
        if self.target is not None:
            tau = target_momentum_at(self.step, total_steps=self.total_steps, base=cfg.target_ema,
                                     schedule=cfg.target_ema_schedule)
            ema_update_(self._target_params, self._online_params, tau)
        _, correct, counted = self.probe.step(h.detach(), torch.cat([y, y]))

        with torch.no_grad():
            loss_d = loss.detach()
            finite = torch.isfinite(loss_d)
            health = torch.stack([
                torch.where(finite, loss_d, torch.zeros_like(loss_d)), correct.float(), counted.float(),
                output_std(z.detach()), (~finite).float(), torch.ones_like(loss_d), torch.zeros_like(loss_d),
            ])
            self._acc += health
        recorded = self.spectrum.observe(self.step, z.detach(), self.online.predictor)
        if recorded is not None:
            self._last_health = recorded
        self.step += 1
        self.batch_in_epoch += 1

    def _warmup_steps(self) -> int:
        return round(self.cfg.warmup_epochs * self.steps_per_epoch)

    # --- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        previous = self._install_signal_handlers()
        self._open_tensorboard()
        try:
            return self._fit()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _open_tensorboard(self) -> None:
        # After any resume: events past the checkpoint's step are purged, and its spectrum records were logged.
        if self.cfg.tensorboard and self.rank == 0:
            self.tensorboard = TensorBoardLog(self.run.path / "tensorboard", purge_from=self.step + 1 if self.step
                                              else None)
            self._spectrum_logged = len(self.spectrum)

    def _fit(self) -> dict:
        cfg = self.cfg
        bar = self._progress()
        views = self.sources.train_views
        start = time.perf_counter()
        last_log_images, last_log_time = self.images_seen, self.train_time
        # [consecutive non-finite losses up to the last step, this interval's count of them before it], on the
        # device: the divergence guard reads it with the accumulators, so no step waits on the host for it.
        self._guard = torch.zeros(2, device=self.device)
        while self.epoch < cfg.epochs and not self._done():
            views.set_epoch(self.epoch, self.batch_in_epoch)
            t0 = time.perf_counter()
            for x1, x2, y in views:
                self.train_step(x1, x2, y)
                self._extend_nonfinite_run()
                self.images_seen += self.global_batch
                stop_here = self.stop_signal is not None and self.world_size == 1
                epoch_end = self.batch_in_epoch == self.steps_per_epoch
                if self.step % cfg.log_every == 0 or epoch_end or stop_here or self._done():
                    values = self._read_accumulators()  # waits for the device: the interval's time is exact
                    self.train_time += time.perf_counter() - t0
                    record = self._interval_record(values)
                    interval = self.train_time - last_log_time
                    record["images_per_sec"] = (self.images_seen - last_log_images) / max(interval, 1e-9)
                    last_log_images, last_log_time = self.images_seen, self.train_time
                    self._log(record, bar)
                    self._check_divergence(values)  # before this state reaches any checkpoint
                    stop_here = record.pop("stop_requested") or stop_here
                    if epoch_end:  # the epoch's evaluation and checkpoint, before any stop: resumes start clean
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                        self._end_of_epoch(bar)
                    if stop_here:
                        return self._stop(bar)
                    t0 = time.perf_counter()  # evaluation and checkpoints are not training time
                if self._done():
                    break
        if bar is not None:
            bar.close()
        self._save_checkpoint()  # skipped when the last epoch's has just been written
        self._final_phase = True
        return self._finish(time.perf_counter() - start)

    def _done(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _read_accumulators(self) -> dict[str, float]:
        acc = self._acc
        if self.stop_signal is not None:
            acc[_ACC.index("stop")] = 1.0
        # Whether a parameter or buffer is non-finite rides along: one fused reduction, read with the rest.
        packed = torch.cat([acc, (~self._model_finite()).to(acc.dtype).reshape(1)])
        if self.world_size > 1:
            dist.all_reduce(packed)  # sums over ranks; also how every rank learns that one was asked to stop
        values = dict(zip((*_ACC, "nonfinite_model"), packed.tolist(), strict=True))
        values["nonfinite_run"] = 0
        if self._guard is not None:
            if values["nonfinite_loss"]:  # rare: one more collective, so that every process takes the longest run
                run = self._guard[:1].clone()
                if self.world_size > 1:
                    dist.all_reduce(run, op=dist.ReduceOp.MAX)
                values["nonfinite_run"] = int(run.item())
            self._guard[1] = 0  # the interval's count starts again below
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
            record["target_ema"] = target_momentum_at(self.step, total_steps=self.total_steps,
                                                      base=self.cfg.target_ema, schedule=self.cfg.target_ema_schedule)
        record.update({k: self._last_health.get(k) for k in ("effective_rank", "f_eig_max", "f_eig_min")})
        if self.cfg.compile:
            record.update(compile_counts())
        return record

    def _append(self, record: dict) -> None:
        """A metrics.jsonl line (rank 0 writes), and its TensorBoard view with --tensorboard."""
        self.run.append_metrics(record)
        if self.tensorboard is not None:
            self.tensorboard.log(record)
            for step, f_eigs in self.spectrum.records_since(self._spectrum_logged):
                self.tensorboard.spectrum(step, f_eigs)
            self._spectrum_logged = len(self.spectrum)

    def _log(self, record: dict, bar) -> None:
        self._append(record)
        if self.rank != 0:
            return
        if bar is not None:
            bar.update(record["step"] - bar.n)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.0f}", refresh=False)
        else:
            probe = record["online_probe_acc"]
            print(f"step {record['step']:>7}  epoch {record['epoch']:7.2f}  loss {record['loss']:.4f}  "
                  f"lr {record['lr']:.4g}  {record['images_per_sec']:8.0f} img/s  std {record['output_std']:.3f}"
                  + (f"  probe {probe:.3f}" if probe is not None else ""), flush=True)

    def _end_of_epoch(self, bar) -> None:
        cfg = self.cfg
        if cfg.knn_every and self.sources.has_probes and self.epoch % cfg.knn_every == 0:
            knn = self._knn()
            self._append({"kind": "eval", "step": self.step, "epoch": float(self.epoch), "knn_acc": knn})
            if self.rank == 0 and knn is not None:
                message = f"epoch {self.epoch}: kNN accuracy on the held-out set {knn:.4f}"
                print(message, flush=True) if bar is None else bar.write(message)
        if (self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs
                or (cfg.keep_every and self.epoch % cfg.keep_every == 0)):
            self._save_checkpoint()

    # Evaluation runs on every rank (fastpred.eval): each extracts its shard of the probes' sets, the kNN scores
    # every query against each rank's part of the bank, the final probe trains data-parallel.
    _final_eval: tuple | None = None  # (step, features, kNN accuracy) of a monitor that the final evaluation reuses

    def _features(self, backbone: nn.Module) -> tuple:
        """((train features, labels), (held-out features, labels)): this rank's shards, fp32 on the device."""
        amp, feat_dim = self.amp, self.probe.feat_dim
        train = extract_features(backbone, self.sources.probe_train(), train_data.normalize, self.device, amp=amp,
                                 feat_dim=feat_dim)
        val = extract_features(backbone, self.sources.probe_val(), train_data.normalize, self.device, amp=amp,
                               feat_dim=feat_dim)
        return train, val

    def _knn(self) -> float:
        """The kNN monitor; the features stay when the final evaluation follows at this step (extracted once)."""
        feats = self._features(self.online.backbone)
        knn = self._knn_of(feats)
        if self.epoch == self.cfg.epochs or self._done():
            self._final_eval = (self.step, feats, knn)
        return knn

    def _knn_of(self, feats: tuple) -> float:
        (xt, yt), (xv, yv) = feats
        return knn_accuracy(xt, yt, xv, yv, k=self.cfg.knn_k, block=self.sources.probes.align)

    # --- stop, resume, finish -----------------------------------------------------------------------------
    # The loop's edges (divergence guard, checkpoints, signals) keep their state here, set as the run goes.
    _guard: torch.Tensor | None = None  # see _fit
    _saved_step: int = -1  # the step of the checkpoint on disk (written or resumed from)
    _last_checkpoint: tuple[int, int] | None = None  # (step, epoch) of the last good checkpoint
    _checked_step: int = 0  # the step at which the model was last found finite
    _final_phase: bool = False  # training done and checkpointed: only the final evaluation is left

    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):
            if self._final_phase:
                # Nothing to save: the last step's checkpoint is written. Stop now rather than after the final
                # evaluation (hours on ImageNet, past any grace period); a resume runs it again.
                if self.rank == 0:
                    print(f"\n{signal.Signals(signum).name}: stopped in the final evaluation; the checkpoint of "
                          f"step {self.step} is written", file=sys.stderr, flush=True)
                raise Stopped(128 + signum)
            if self.stop_signal is not None:
                if signum == signal.SIGINT:  # Ctrl-C twice: give up at once
                    raise KeyboardInterrupt
                # A repeated SIGTERM is the same request: at preemption the scheduler signals every process and
                # torchrun's agent forwards its own copy to the workers; SIGKILL is their way to insist.
                return
            self.stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint",
                  file=sys.stderr, flush=True)

        return {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def _stop(self, bar) -> dict:
        if bar is not None:
            bar.close()
        self._save_checkpoint()
        signum = self.stop_signal or signal.SIGTERM  # the processes that were not signalled learned it from another
        if self.rank == 0:
            with contextlib.suppress(WriteError):
                self.run.record_event("stopped", step=self.step, epoch=self.epoch, signal=signal.Signals(signum).name)
            print(f"stopped at step {self.step}; checkpoint written. Continue with: "
                  f"python -m fastpred.train --resume {self.run.path} (or the same command with --auto-resume)",
                  file=sys.stderr, flush=True)
        raise Stopped(128 + signum)

    # --- the divergence guard ------------------------------------------------------------------------------
    def _extend_nonfinite_run(self) -> None:
        """After each step, on the device: the run of consecutive non-finite losses grows by one or restarts at 0
        (a few scalar kernels, no host wait)."""
        g, count = self._guard, self._acc[_ACC.index("nonfinite_loss")]
        g[0] = (g[0] + 1) * (count - g[1])  # count - g[1]: 1 if this step's loss was non-finite, else 0
        g[1] = count

    def _model_finite(self) -> torch.Tensor:
        modules = [self.online] if self.target is None else [self.online, self.target]
        return _all_finite(itertools.chain.from_iterable(
            itertools.chain(m.parameters(), m.buffers()) for m in modules), self.device)

    def _check_divergence(self, values: dict) -> None:
        """End the run (Diverged) on non-finite parameters, or on --max-nonfinite-steps consecutive non-finite
        losses up to this log interval; both were read with the interval's accumulators."""
        run, limit = values["nonfinite_run"], self.cfg.max_nonfinite_steps
        first = self.step - run + 1
        if values["nonfinite_model"]:
            loss = f"; first non-finite loss at step {first}" if run else ""
            self._diverged(f"non-finite parameters at step {self.step} (still finite at step {self._checked_step}"
                           f"{loss})")
        if limit and run >= limit:
            self._diverged(f"the loss was non-finite at {run} consecutive steps, from step {first} to step "
                           f"{self.step} (--max-nonfinite-steps {limit})")
        self._checked_step = self.step

    def _diverged(self, reason: str) -> None:
        run = self.run.path
        if self._last_checkpoint is None:
            last = "no checkpoint was written before it: start again with a lower --lr (and another --out)"
        else:
            step, epoch = self._last_checkpoint
            last = (f"last good checkpoint: {run / 'checkpoint.pt'} (epoch {epoch}, step {step}); continue from it "
                    f"with a lower learning rate: python -m fastpred.train --resume {run} --lr {self.cfg.lr / 10:g}")
        if self.rank == 0:
            with contextlib.suppress(WriteError):  # a full disk must not hide the divergence
                self.run.record_event("diverged", step=self.step, reason=reason,
                                      checkpoint_step=None if self._last_checkpoint is None else step)
        raise Diverged(f"training diverged: {reason}; {last}")

    def _check_resumable(self, state: dict) -> None:
        """The checkpoint's schedule is this run's: the same global batch (lr scaling, steps per epoch) and the same
        steps per epoch, whatever the number of processes. Checkpoints that predate these keys pass."""
        saved_ws, saved_batch = state.get("world_size"), state.get("global_batch")
        if saved_batch is not None and saved_batch != self.global_batch:
            per = saved_batch // self.world_size
            keep = (f"or keep the global batch with --resume {self.run.path} --batch-size {per}"
                    if saved_batch % self.world_size == 0 and per >= 2
                    else f"({saved_batch} images do not split evenly over {self.world_size} processes)")
            raise RunError(
                f"the checkpoint was written by {saved_ws} process(es) with a global batch of {saved_batch}; this run "
                f"has {self.world_size} x {self.cfg.batch_size} = {self.global_batch} images per step, which would "
                f"change the learning rate, the steps per epoch and the whole schedule. Resume with {saved_ws} "
                f"process(es), {keep}")
        saved_steps = state.get("steps_per_epoch")
        if saved_steps is not None and saved_steps != self.steps_per_epoch:
            raise RunError(
                f"this run's data gives {self.steps_per_epoch} steps per epoch, the checkpoint's gave {saved_steps}: "
                f"the schedule would not match (other data, or {self.world_size} processes splitting it otherwise)")

    def state_dict(self) -> dict:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(self.cfg),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            # What the schedule was computed with: a resume on another number of processes is checked against it.
            "world_size": self.world_size, "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
            "backbone": self.online.backbone.state_dict(), "projector": self.online.projector.state_dict(),
            "predictor": self.online.predictor.state_dict() if self.online.predictor is not None else {},
            "probe": self.probe.probe_state(), "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    **({"cuda": torch.cuda.get_rng_state(self.device)} if self.cuda else {})},
            "spectrum": self.spectrum.state_dict(),
            "totals": {"train_time": self.train_time, "images_seen": self.images_seen},
        }
        if self.target is not None:
            state["target_backbone"] = self.target.backbone.state_dict()
            state["target_projector"] = self.target.projector.state_dict()
        state["transient_buffers"] = {name: _transient_buffers(m) for name, m in self._resumed_modules().items()}
        return state

    def _resumed_modules(self) -> dict[str, nn.Module]:
        return {"online": self.online, **({"target": self.target} if self.target is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self._check_resumable(state)
        self.online.backbone.load_state_dict(state["backbone"])
        self.online.projector.load_state_dict(state["projector"])
        if self.online.predictor is not None:
            self.online.predictor.load_state_dict(state["predictor"])
        if self.target is not None:
            self.target.backbone.load_state_dict(state["target_backbone"])
            self.target.projector.load_state_dict(state["target_projector"])
        for name, module in self._resumed_modules().items():
            own = _transient_buffers(module)
            for key, value in state.get("transient_buffers", {}).get(name, {}).items():
                if key in own:
                    own[key].copy_(value)
        self.probe.load_probe_state(state["probe"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.cuda and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.rank == 0:
            self.spectrum.load_state_dict(state["spectrum"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.train_time = state["totals"]["train_time"]
        self.images_seen = state["totals"]["images_seen"]
        self.run.truncate_metrics(self.step)
        self._saved_step = self._checked_step = self.step
        self._last_checkpoint = (self.step, self.epoch)

    def _save_checkpoint(self) -> None:
        """checkpoint.pt from rank 0, once the state is found finite on the device (one fused reduction, read once:
        the write waits for the device anyway), and checkpoint-epochNNNN.pt at --keep-every epochs. Every process
        learns the outcome, so that all end the same way when the state is non-finite or the write fails."""
        cfg = self.cfg
        keep = cfg.keep_every and self.batch_in_epoch == 0 and self.epoch % cfg.keep_every == 0
        fresh = self.step != self._saved_step  # the end of training and a stop may follow the epoch's checkpoint
        state = self.state_dict() if fresh else None
        if fresh:
            bad = (~_all_finite(_tensors_in(state), self.device)).float().reshape(1)
            if self.world_size > 1:
                dist.all_reduce(bad)
            if bad.item():
                self._diverged(f"non-finite values in the state to checkpoint at step {self.step} (first: "
                               f"{_first_nonfinite(state) or 'on another process'}); nothing was written")
        failed = None
        if self.rank == 0:
            try:
                if fresh:
                    self.run.save_checkpoint(state)
                    if self.spectrum.every:
                        with writing(self.run.path / "spectrum.npz"):
                            self.spectrum.save(self.run.path / "spectrum.npz")
                if keep and (fresh or not (self.run.path / kept_name(self.epoch)).exists()):
                    self.run.keep_checkpoint(self.epoch)
            except WriteError as e:
                failed = e
        status = torch.tensor([float(failed is not None)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(status)  # also the barrier: no process runs ahead of the write
        if status.item():
            raise failed or WriteError("process 0 could not write the checkpoint")
        self._saved_step = self.step
        self._last_checkpoint = (self.step, self.epoch)

    def _finish(self, wall: float) -> dict:
        cfg = self.cfg
        last = self._last_metrics()
        summary = {
            "steps": self.step, "epochs": self.step / self.steps_per_epoch, "train_time_s": self.train_time,
            "wall_time_s": wall, "images_per_sec": self.images_seen / max(self.train_time, 1e-9),
            "output_std": last.get("output_std"), "effective_rank": self._last_health.get("effective_rank"),
            "linear_probe_acc": None, "linear_probe_acc_random_init": None, "knn_acc": None,
            "held_out": self.sources.held_out_note,
        }
        if self.sources.has_probes:
            reuse, self._final_eval = self._final_eval, None
            if reuse is not None and reuse[0] == self.step:
                _, trained, summary["knn_acc"] = reuse
            else:
                trained = self._features(self.online.backbone)
                summary["knn_acc"] = self._knn_of(trained)
            if cfg.final_probe:
                summary["linear_probe_acc"] = self._linear_probe(trained)
                del trained, reuse  # the random-init features take their place in memory
                random_init = backbone_at_init(cfg)[0].to(self.device)
                if self.channels_last:
                    random_init.to(memory_format=torch.channels_last)
                summary["linear_probe_acc_random_init"] = self._linear_probe(self._features(random_init))
        self.run.write_summary(summary)
        if self.tensorboard is not None:
            self.tensorboard.log({**summary, "step": self.step})
        return summary

    def _linear_probe(self, feats: tuple) -> float:
        (xt, yt), (xv, yv) = feats
        return linear_probe_accuracy(xt, yt, xv, yv, epochs=self.cfg.final_probe_epochs, seed=self.cfg.seed,
                                     device=self.device)

    def _last_metrics(self) -> dict:
        path = self.run.path / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return {}
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [r for r in lines if r.get("kind") == "train"]
        return train[-1] if train else {}

    def _progress(self):
        cfg = self.cfg
        wanted = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty())
        if self.rank != 0 or not wanted:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps if not cfg.max_steps else min(cfg.max_steps, self.total_steps),
                    initial=self.step, unit="step", dynamic_ncols=True)


def _tensors_in(tree) -> Iterator[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples (a state dict, an optimizer's)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors_in(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors_in(v)


def _transient_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a module keeps out of its state_dict (persistent=False) that its numerics still depend on, such
    as SyncBatchNorm's variance shift: saved beside the state dicts (whose keys stay torchvision's), so that a
    resumed run rounds as the uninterrupted one did."""
    persistent = module.state_dict(keep_vars=True).keys()
    return {name: b for name, b in module.named_buffers() if name not in persistent}


def _all_finite(tensors, device: torch.device) -> torch.Tensor:
    """A bool on `device`: no floating-point element of `tensors` is NaN or infinite. One sum of |x| over all of
    them (torch's foreach norm: a few fused kernels per device and dtype, whatever their number; tensors on other
    devices, such as Adam's step counts on the CPU, are reduced where they live): NaN and inf survive a sum, and a
    finite sum overflows only at |x| ~ 3e38 / numel, itself a divergence."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.nn.utils.get_total_norm(floats, norm_type=1.0)).to(device)


def _first_nonfinite(state: dict, prefix: str = "") -> str | None:
    """The key of the first tensor with a non-finite element (one host read per tensor: for the error line only)."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return name
        elif found := _first_nonfinite(v, f"{name}."):
            return found
    return None


class Stopped(Exception):
    """Raised after a signal's checkpoint is written; carries the exit code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code
