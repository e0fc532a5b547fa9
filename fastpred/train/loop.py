"""The training loop: data, both views through the network in one call, loss, backward, optimizer, target EMA,
metrics. Everything around it (config, models, optimizers, data, probes, spectra, the run folder) is imported.

Nothing inside a step waits on the host: losses, probe counts and health measures accumulate on the device and
are read once per log interval (the spectrum recorder reads its own, on its record steps only).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import nn

from fastpred.data.augment import BYOLAugment
from fastpred.train import data as train_data
from fastpred.train import distributed
from fastpred.train.config import Config
from fastpred.train.models import build_backbone, build_predictor, build_projector
from fastpred.train.optim import build_optimizer, ema_update_, lr_at, param_groups, target_momentum_at
from fastpred.train.probes import OnlineProbe, extract_features, knn_accuracy, linear_probe_accuracy
from fastpred.train.run_dir import CHECKPOINT_FORMAT, RunDir
from fastpred.train.spectrum import SpectrumRecorder

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


def backbone_at_init(cfg: Config) -> tuple[nn.Module, int]:
    """The backbone exactly as a run with this seed starts (the random-init baseline of the final probe), and
    its feature width."""
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.backbone)


class Trainer:
    def __init__(self, cfg: Config, run: RunDir, *, rank: int, world_size: int, device: torch.device):
        self.cfg, self.run, self.rank, self.world_size, self.device = cfg, run, rank, world_size, device
        self.cuda = device.type == "cuda"
        self.sources = train_data.Sources(cfg, rank=rank, world_size=world_size, device=device)
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
        if world_size > 1 and cfg.sync_bn and self.cuda:
            online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        self.online = online.to(device)
        if self.cuda and cfg.channels_last:
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

        base_lr = cfg.lr * (self.global_batch / 256 if cfg.lr_scaling == "linear" else 1.0)
        self.base_lr = base_lr
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
            self.online.backbone.compile()
            self.online.projector.compile()
            if self.target is not None:
                self.target.backbone.compile()
                self.target.projector.compile()

        self.step = self.epoch = self.batch_in_epoch = 0
        self.train_time = 0.0  # seconds in training steps (evaluation and checkpoints excluded)
        self.images_seen = 0  # source images (two views each), all ranks
        self.stop_signal: int | None = None
        self._last_health: dict = {}
        self._acc = torch.zeros(len(_ACC), device=device)

    def _num_classes(self) -> int:
        if self.cfg.data == "synthetic":
            return train_data.SYNTHETIC_CLASSES
        if self.cfg.data == "digits":
            return 10
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
        for group in self.optimizer.param_groups:  # host floats: setting them is not a sync
            group["lr"] = lr_at(self.step, total_steps=self.total_steps, warmup_steps=self._warmup_steps(),
                                base_lr=self.base_lr, schedule=cfg.schedule)
        x = torch.cat([v1, v2])  # both views through the network in one call, as DirectPred's statistics expect
        if self.cuda and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda and cfg.amp):
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
        try:
            return self._fit()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _fit(self) -> dict:
        cfg = self.cfg
        bar = self._progress()
        views = self.sources.train_views
        start = time.perf_counter()
        last_log_images, last_log_time = self.images_seen, self.train_time
        while self.epoch < cfg.epochs and not self._done():
            views.set_epoch(self.epoch, self.batch_in_epoch)
            t0 = time.perf_counter()
            for x1, x2, y in views:
                self.train_step(x1, x2, y)
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
        self._save_checkpoint()
        return self._finish(time.perf_counter() - start)

    def _done(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _read_accumulators(self) -> dict[str, float]:
        acc = self._acc
        if self.stop_signal is not None:
            acc[_ACC.index("stop")] = 1.0
        if self.world_size > 1:
            dist.all_reduce(acc)  # sums over ranks; also how every rank learns that one was asked to stop
        values = dict(zip(_ACC, acc.tolist(), strict=True))
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
        return record

    def _log(self, record: dict, bar) -> None:
        self.run.append_metrics(record)
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
            self.run.append_metrics({"kind": "eval", "step": self.step, "epoch": float(self.epoch), "knn_acc": knn})
            if self.rank == 0 and knn is not None:
                message = f"epoch {self.epoch}: kNN accuracy on the held-out set {knn:.4f}"
                print(message, flush=True) if bar is None else bar.write(message)
        if self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs:
            self._save_checkpoint()

    def _features(self, backbone: nn.Module) -> tuple:
        train = extract_features(backbone, self.sources.probe_train(), train_data.normalize, self.device)
        val = extract_features(backbone, self.sources.probe_val(), train_data.normalize, self.device)
        return train, val

    def _knn(self) -> float | None:
        """The kNN monitor runs on rank 0 over the whole held-out set; the others wait at a barrier."""
        knn = None
        if self.rank == 0:
            (xt, yt), (xv, yv) = self._features(self.online.backbone)
            knn = knn_accuracy(xt.to(self.device), yt.to(self.device), xv.to(self.device), yv.to(self.device),
                               k=self.cfg.knn_k)
        distributed.barrier()
        return knn

    # --- stop, resume, finish -----------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):
            if self.stop_signal is not None:  # a second signal: give up at once
                raise KeyboardInterrupt
            self.stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint",
                  file=sys.stderr, flush=True)

        return {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def _stop(self, bar) -> dict:
        if bar is not None:
            bar.close()
        self._save_checkpoint()
        if self.rank == 0:
            print(f"stopped at step {self.step}; checkpoint written. Continue with: "
                  f"python -m fastpred.train --resume {self.run.path}", file=sys.stderr, flush=True)
        raise Stopped(128 + (self.stop_signal or signal.SIGTERM))

    def state_dict(self) -> dict:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(self.cfg),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
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
        return state

    def load_state_dict(self, state: dict) -> None:
        self.online.backbone.load_state_dict(state["backbone"])
        self.online.projector.load_state_dict(state["projector"])
        if self.online.predictor is not None:
            self.online.predictor.load_state_dict(state["predictor"])
        if self.target is not None:
            self.target.backbone.load_state_dict(state["target_backbone"])
            self.target.projector.load_state_dict(state["target_projector"])
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

    def _save_checkpoint(self) -> None:
        if self.rank == 0:
            self.run.save_checkpoint(self.state_dict())
            if self.spectrum.every:
                self.spectrum.save(self.run.path / "spectrum.npz")
        distributed.barrier()

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
        if self.sources.has_probes and self.rank == 0:
            trained = self._features(self.online.backbone)
            summary["knn_acc"] = knn_accuracy(trained[0][0], trained[0][1], trained[1][0], trained[1][1],
                                              k=cfg.knn_k)
            if cfg.final_probe:
                summary["linear_probe_acc"] = self._linear_probe(trained)
                random_init = backbone_at_init(cfg)[0].to(self.device)
                summary["linear_probe_acc_random_init"] = self._linear_probe(self._features(random_init))
        distributed.barrier()
        self.run.write_summary(summary)
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


class Stopped(Exception):
    """Raised after a signal's checkpoint is written; carries the exit code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code
