"""One BYOL training step on `--data synthetic`: the trainer's step against the same model stepped by hand.

Every provider of a case gets the same resolved Config (`fastpred.train.config.resolve`), a model built by
`fastpred.train.loop.Trainer` itself (backbone, projector, predictor, EMA target, optimizer) and the same
float views (B, 3, H, W), drawn once from a seeded generator (standard normal: what normalised images look
like to the network). Only the step differs:

- `trainer`: `Trainer.optimize(v1, v2, y)` with the DirectPredictor: lr set, both views in one forward, loss,
  backward, optimizer, target EMA, online probe, device-side metrics, spectrum recorder (its record steps,
  every `spectrum_every` steps, land in the timed rounds like any other step).
- `bare`: the same modules (the same DirectPredictor instance), a minimal step written here: one forward of
  cat(v1, v2), the loss, zero_grad, backward, optimizer.step, one foreach EMA. No probe, no metrics, no
  spectrum, no lr setting. trainer / bare - 1 is the trainer's overhead.
- `reference`: a plain loop as the official DirectPred code writes it: one forward per view (BatchNorm sees
  each view alone), fp32 (no autocast, contiguous NCHW), the predictor W set by the official formulation
  (`bench.formulations.OfficialStep`: per-sample outer products, EMA, `torch.linalg.eigh`, every step) on
  both views' projections, a target forward per view, and a per-parameter EMA loop.
- `linear`: `Trainer.optimize` with `predictor="linear"` (a trained bias-free d x d head): trainer / linear
  - 1 is what DirectPred costs over the cheapest predictor.

Nominal work, the same for every provider of a case: flops = 4 x the forward flops of backbone + projector
on the 2B views (online forward, backward counted as twice the forward, target forward), counted once by
`torch.utils.flop_counter`; bytes = the views read once + 7 x the parameter bytes (optimizer: read p, g and
momentum, write p and momentum; EMA: read and write the target), activations left out, so GB/s is a floor.
"""

from __future__ import annotations

import gc

import pytest
import torch

from bench.formulations import OfficialStep
from bench.harness import DEVICE, FULL, measure
from fastpred.train import config as train_config
from fastpred.train.data import SYNTHETIC_CLASSES
from fastpred.train.loop import Trainer
from fastpred.train.optim import ema_update_
from fastpred.train.run_dir import RunDir, environment
from fastpred.train.step import ssl_loss

CUDA = DEVICE.type == "cuda"

# (case id, preset, batch per step, cuda only). On the cut CPU grid cifar10's model runs at batch 8 so the
# suite stays near a minute on 2 cores (batch 32: ~5.7 s a step on one EPYC core, 3 minutes for the suite);
# on a GPU (or FASTPRED_BENCH_FULL=1) at the preset's batch 128.
SHAPES = [
    ("digits-B128", "digits", 128, False),  # small_cnn, 16 px, proj 256 -> 64
    ("cifar10-B128" if FULL else "cifar10-B8", "cifar10", 128 if FULL else 8, False),  # resnet18_small, 32 px
    ("imagenet-B256", "imagenet", 256, True),  # resnet50, 224 px, proj 4096 -> 256, LARS, bf16, channels_last
]
PROVIDERS = ["trainer", "bare", "reference", "linear"]
CASES = [(shape, provider) for shape in SHAPES for provider in PROVIDERS]

_FLOPS: dict[str, float] = {}  # case id -> nominal flops, counted once per case


@pytest.fixture
def free_memory():
    yield
    gc.collect()  # a ResNet-50 trainer per test: release the last one's device memory before the next
    if CUDA:
        torch.cuda.empty_cache()


def build_trainer(preset: str, batch: int, predictor: str, tmp_path) -> Trainer:
    cfg = train_config.resolve(
        {
            "data": "synthetic",
            "preset": preset,
            "batch_size": batch,
            "predictor": predictor,
            "device": DEVICE.type,
            "out": str(tmp_path / "run"),
        }
    )
    run = RunDir.create(cfg.out, writer=True)
    run.start(train_config.to_json(cfg), environment(DEVICE, 1))
    return Trainer(cfg, run, rank=0, world_size=1, device=DEVICE)


def views(cfg, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device).manual_seed(1234)
    shape = (cfg.batch_size, 3, cfg.resolution, cfg.resolution)
    v1 = torch.randn(shape, generator=g, device=device)
    v2 = torch.randn(shape, generator=g, device=device)
    y = torch.randint(0, SYNTHETIC_CLASSES, (cfg.batch_size,), generator=g, device=device)
    return v1, v2, y


def bare_step(tr: Trainer, v1: torch.Tensor, v2: torch.Tensor):
    """The trainer's model, optimizer and EMA in the fewest lines: what the step costs without the trainer."""
    cfg, online, target, opt = tr.cfg, tr.online, tr.target, tr.optimizer
    tau = cfg.target_ema  # the EMA's cost does not depend on tau's schedule
    memory_format = torch.channels_last if CUDA and cfg.channels_last else torch.contiguous_format

    def step() -> None:
        x = torch.cat([v1, v2]).contiguous(memory_format=memory_format)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA and cfg.amp):
            _, z, p = online(x)
            with torch.no_grad():
                t = target.projector(target.backbone(x))
        loss = ssl_loss(p, t, "byol")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update_(tr._target_params, tr._online_params, tau)

    return step


def reference_step(tr: Trainer, v1: torch.Tensor, v2: torch.Tensor):
    """The official loop: a forward per view, fp32, W from per-sample outer products and eigh each step."""
    cfg, online, target, opt = tr.cfg, tr.online, tr.target, tr.optimizer
    online.to(memory_format=torch.contiguous_format)  # the official code knows no channels_last
    target.to(memory_format=torch.contiguous_format)
    stats = OfficialStep(cfg.proj_dim, rho=cfg.rho, eps=cfg.eps, alpha=cfg.alpha, device=DEVICE)
    pairs = list(zip(tr._target_params, tr._online_params, strict=True))
    tau = cfg.target_ema

    def regression(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 2 - 2 * (torch.nn.functional.normalize(p, dim=1) * torch.nn.functional.normalize(t, dim=1)).sum(1)

    def step() -> None:
        z1 = online.projector(online.backbone(v1))
        z2 = online.projector(online.backbone(v2))
        p1, p2 = z1 @ stats.W, z2 @ stats.W  # W as it was before this step's statistics
        with torch.no_grad():
            t1 = target.projector(target.backbone(v1))
            t2 = target.projector(target.backbone(v2))
            stats.step(torch.cat([z1, z2]).detach())  # fold both views, eigh, W (its own z @ W: N d^2, noise)
        loss = (regression(p1, t2) + regression(p2, t1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, po in pairs:
                pt.mul_(tau).add_(po, alpha=1 - tau)

    return step


def nominal_flops(case: str, tr: Trainer, v1: torch.Tensor, v2: torch.Tensor) -> float:
    if case not in _FLOPS:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:  # the target's forward: the same modules and shapes as the online one
            tr.target.projector(tr.target.backbone(torch.cat([v1, v2])))
        _FLOPS[case] = 4.0 * counter.get_total_flops()
    return _FLOPS[case]


@pytest.mark.parametrize(("shape", "provider"), CASES, ids=[f"{provider}-{shape[0]}" for shape, provider in CASES])
def test_train_step(benchmark, ceiling, tmp_path, free_memory, shape, provider):
    case, preset, batch, cuda_only = shape
    if cuda_only and not CUDA:
        pytest.skip(f"{case} needs CUDA (ResNet-50 at 224 px, batch 256)")
    if not hasattr(Trainer, "optimize"):
        pytest.skip("this Trainer has no optimize(v1, v2, y)")
    tr = build_trainer(preset, batch, "linear" if provider == "linear" else "directpred", tmp_path)
    cfg = tr.cfg
    v1, v2, y = views(cfg, DEVICE)
    flops = nominal_flops(case, tr, v1, v2)
    param_bytes = sum(p.numel() * p.element_size() for p in tr._online_params)
    if provider in ("trainer", "linear"):

        def fn() -> None:
            tr.optimize(v1, v2, y)

    elif provider == "bare":
        fn = bare_step(tr, v1, v2)
    else:
        fn = reference_step(tr, v1, v2)
    reference = provider == "reference"
    measure(
        benchmark,
        fn,
        ceiling=ceiling,
        flops=flops,
        bytes_moved=2.0 * v1.numel() * v1.element_size() + 7.0 * param_bytes,
        provider=provider,
        baseline="bare",
        case=case,
        preset=preset,
        backbone=cfg.backbone,
        resolution=cfg.resolution,
        batch=cfg.batch_size,
        proj_dim=cfg.proj_dim,
        predictor="official" if reference else cfg.predictor,
        optimizer=cfg.optimizer,
        autocast="bf16" if CUDA and cfg.amp and not reference else "none",
        channels_last=CUDA and cfg.channels_last and not reference,
        spectrum_every=cfg.spectrum_every if provider in ("trainer", "linear") else 0,
    )
