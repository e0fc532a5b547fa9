"""The training step and what it updates: the online network (backbone -> projector -> predictor), the EMA target,
the optimizer and its learning-rate schedule, the online probe, the augmentation, and the device accumulators of the
run's health. `Learner.optimize` is the step, top to bottom: both views through the network in one call, loss,
backward, optimizer, target EMA, probe, metrics.

Nothing inside a step waits on the host: losses, probe counts and health measures accumulate on the device (`HEALTH`)
and are read once per log interval by the loop (the spectrum recorder reads its own, on its record steps only).
A `Learner` has no data source and no run folder: `fastpred.train.loop.Trainer` adds those, and bench/ times
`optimize` on its own.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as nnf
from torch import nn

from fastpred.core import distributed
from fastpred.core.models import build_backbone, build_predictor, build_projector
from fastpred.data.augment import BYOLAugment
from fastpred.train.config import Config, ConfigError
from fastpred.train.losses import iso_term
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
from fastpred.train.spectrum import SpectrumRecorder
from fastpred.train.sync_bn import convert_sync_batchnorm

#: The accumulators read once per log interval, in this order (one device vector, one host read).
HEALTH = ("loss", "probe_correct", "probe_counted", "output_std", "nonfinite_loss", "steps", "stop")


class Online(nn.Module):
    """backbone -> projector -> predictor; returns the features h, the projections z and the predictions p.

    `detach_input`: the predictor sees z.detach() (IsoLoss: the encoder's gradient comes from `iso_term`, not
    through the predictor; a trained head still learns from the loss at p)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None, *,
                 detach_input: bool = False):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.detach_input = detach_input

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.backbone(x)  # (2B, feat)
        z = self.projector(h)  # (2B, d)
        if self.predictor is None:
            return h, z, z
        return h, z, self.predictor(z.detach() if self.detach_input else z)


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


class Learner:
    """The networks, the optimizer and the training step of one process.

    Built in a fixed order from `cfg.seed` (the backbone first, then the projector and predictor from seed + 1), so
    every process and every resumed run starts from the same weights. `step` counts optimizer steps and
    `batch_in_epoch` the batches of the current epoch; both advance in `optimize`.
    """

    def __init__(self, cfg: Config, *, rank: int, world_size: int, device: torch.device, num_classes: int,
                 steps_per_epoch: int):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.cuda = device.type == "cuda"
        # bf16 autocast: on CUDA, or on the CPU to rehearse the CUDA step (CPU autocast follows CUDA's op policy, so
        # what would fail in bf16 on a GPU fails here too), or on the CPU when asked (--cpu-amp: never by default, it
        # changes the precision of the convolutions and matmuls).
        if cfg.cpu_amp and not self.cuda and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise ConfigError("--cpu-amp needs a CPU with bf16 instructions (avx512_bf16 or AMX); this one has none")
        self.amp = cfg.amp and (self.cuda or cfg.cuda_rehearsal or cfg.cpu_amp)
        # Channels-last on every device: oneDNN's CPU convolutions are faster in it too, in the same fp32 (one thread,
        # forward + backward: small_cnn at 28 px, 512 views, 187 -> 143 ms; resnet18_small at 32 px -10%).
        self.channels_last = cfg.channels_last
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        self.global_batch = cfg.batch_size * world_size

        backbone, feat_dim = backbone_at_init(cfg)
        torch.manual_seed(cfg.seed + 1)
        projector = build_projector(feat_dim, cfg.proj_hidden, cfg.proj_dim)
        predictor = build_predictor(
            cfg.predictor, cfg.proj_dim, rho=cfg.rho, eps=cfg.eps, freq=cfg.freq, groups=cfg.groups,
            backend=cfg.backend, sweeps=cfg.sweeps, solver=cfg.solver, trainable=cfg.trainable, hidden=cfg.pred_hidden,
            alpha=cfg.alpha, filter=cfg.filter, filter_scale=self.global_batch,  # sigma^2 = (rows per view) s
        )
        online = Online(backbone, projector, predictor, detach_input=cfg.loss == "iso")
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
        self.probe = OnlineProbe(feat_dim, num_classes, lr=cfg.probe_lr, device=device)
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

        self.step = self.batch_in_epoch = 0
        self._last_health: dict = {}  # the spectrum recorder's latest health measures (effective rank, F's range)
        self._acc = torch.zeros(len(HEALTH), device=device)

    def compile_modules(self, **options) -> None:
        """torch.compile the backbones and projectors module by module (state-dict keys unchanged); the predictor
        stays eager: its refresh is a few small kernels with host-side control flow."""
        modules = [self.online.backbone, self.online.projector]
        if self.target is not None:
            modules += [self.target.backbone, self.target.projector]
        for module in modules:
            module.compile(**options)

    def train_step(self, x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> None:
        """The step on a batch of uint8 views (B, 3, H, W) and labels (B,): augmentation, then `optimize`."""
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
        lr = lr_at(self.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps(), base_lr=self.base_lr,
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
        if cfg.loss == "iso":  # same value; the encoder's gradient is the loss's gradient at p (losses.py)
            loss = loss + iso_term(z, p, t, cfg.method)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if cfg.pred_reg == "symmetric":  # the official code's default for its linear head: W <- (W + W^T) / 2
            symmetrize_(self.online.predictor.linear.weight)
        if self.target is not None:
            ema_update_(self._target_params, self._online_params, self.target_momentum())
        _, correct, counted = self.probe.step(h.detach(), torch.cat([y, y]))

        with torch.no_grad():
            loss_d = loss.detach()
            finite = torch.isfinite(loss_d)
            health = torch.stack([  # in HEALTH's order
                torch.where(finite, loss_d, torch.zeros_like(loss_d)), correct.float(), counted.float(),
                output_std(z.detach()), (~finite).float(), torch.ones_like(loss_d), torch.zeros_like(loss_d),
            ])
            self._acc += health
        recorded = self.spectrum.observe(self.step, z.detach(), self.online.predictor)
        if recorded is not None:
            self._last_health = recorded
        self.step += 1
        self.batch_in_epoch += 1

    def warmup_steps(self) -> int:
        return round(self.cfg.warmup_epochs * self.steps_per_epoch)

    def target_momentum(self) -> float:
        """The target EMA coefficient tau at this step (BYOL's schedule, or constant)."""
        return target_momentum_at(self.step, total_steps=self.total_steps, base=self.cfg.target_ema,
                                  schedule=self.cfg.target_ema_schedule)

    def health_count(self, name: str) -> torch.Tensor:
        """One of the HEALTH accumulators of this log interval, on the device (a view: no host read)."""
        return self._acc[HEALTH.index(name)]
