"""A seeded synthetic feature race after Wen and Li (NeurIPS 2022): which features do a few neurons learn?

Modelling choices (THEORY.md marks the setting of Wen and Li as uncertain; these are ours):
- Data: a sample is ``patches`` patches in R^d, each with N(0, noise^2) entries; the strong feature v1
  (amplitude a1) sits on ``feature_patches`` random patches and the weak feature v2 (amplitude a2) on
  as many others, each feature with its own random sign per sample (shared by its patches, so the two
  views agree on it). v1, v2 are the first two coordinate vectors.
- Views: a random split of the patches into two halves.
- Encoder: m neurons f_i(x) = sum over patches of <w_i, x_p>^3, then BatchNorm per output (batch
  statistics, no affine).
- Loss: symmetrised 1/2 || head(z1) - stopgrad(z2) ||^2 per sample, SimSiam-style (no EMA target).
- Heads: none; Wen and Li's identity-initialised head with trainable off-diagonals
  (`fastpred.OffDiagonalPredictor`) at its own, smaller learning rate; DirectPred
  (`fastpred.DirectPredictor(backend="torch")`, W from the EMA correlation of the head input).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HEADS = ("none", "offdiag", "direct")


@dataclass(frozen=True)
class RaceConfig:
    """Every field is a flag of ``python -m fastpred.dynamics race`` (underscores become dashes)."""

    d: int = 8  # patch dimension
    patches: int = 8  # patches per sample (split 50/50 into the two views)
    feature_patches: int = 2  # patches carrying v1, and as many carrying v2
    neurons: int = 2  # m
    a1: float = 1.0  # amplitude of the strong feature v1
    a2: float = 0.3  # amplitude of the weak feature v2 (a cubic neuron sees a2^3 / a1^3 of the signal)
    noise: float = 0.1  # std of the per-coordinate patch noise
    batch: int = 128
    steps: int = 600
    lr: float = 0.1  # encoder SGD learning rate
    head_lr: float = 0.02  # off-diagonal head learning rate (smaller than the encoder's)
    init: float = 1.0  # norm of each w_i at initialisation (random direction)
    rho: float = 0.3  # DirectPred EMA coefficient
    eps: float = 0.1  # DirectPred eps
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.d < 2 or self.neurons < 1 or self.patches < 2:
            raise ValueError("need d >= 2, neurons >= 1, patches >= 2")
        if 2 * self.feature_patches > self.patches:
            raise ValueError(f"2 * feature_patches ({2 * self.feature_patches}) exceeds patches ({self.patches})")


@dataclass
class RaceResult:
    head: str
    steps: np.ndarray  # (T,)
    alignment: np.ndarray  # |cos(w_i, v_j)|, (T, m, 2)
    head_matrix: np.ndarray | None  # W of the head, (T, m, m); None without a head
    loss: np.ndarray  # (T,)


def sample_views(cfg: RaceConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views (batch, patches / 2, d) of a fresh batch: a random split of each sample's patches."""
    B, P, d, k = cfg.batch, cfg.patches, cfg.d, cfg.feature_patches
    x = cfg.noise * torch.randn(B, P, d, generator=g)
    slots = torch.argsort(torch.rand(B, P, generator=g), dim=1)  # random, disjoint patches for v1 and v2
    for j, a in enumerate((cfg.a1, cfg.a2)):
        sign = torch.randint(0, 2, (B, 1), generator=g).to(x.dtype) * 2 - 1
        on = torch.zeros(B, P).scatter_(1, slots[:, j * k : (j + 1) * k], 1.0)
        x[:, :, j] += a * sign * on
    split = torch.argsort(torch.rand(B, P, generator=g), dim=1)
    half = P // 2
    take = lambda idx: torch.gather(x, 1, idx[..., None].expand(-1, -1, d))  # noqa: E731
    return take(split[:, :half]), take(split[:, half : 2 * half])


def _batchnorm(f: torch.Tensor) -> torch.Tensor:
    return (f - f.mean(0)) / (f.std(0, unbiased=False) + 1e-6)


def run_race(cfg: RaceConfig, head: str) -> RaceResult:
    """Train the encoder (and the head) with one head kind; same seed, same data stream for every head."""
    import fastpred  # the heads; imported here so the ODE parts of fastpred.dynamics load without them

    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    g = torch.Generator().manual_seed(cfg.seed)
    w = torch.randn(cfg.neurons, cfg.d, generator=g)
    w = (cfg.init * w / w.norm(dim=1, keepdim=True)).requires_grad_()
    groups = [{"params": [w], "lr": cfg.lr}]
    pred = None
    if head == "offdiag":
        pred = fastpred.OffDiagonalPredictor(cfg.neurons)
        groups.append({"params": list(pred.parameters()), "lr": cfg.head_lr})
    elif head == "direct":
        pred = fastpred.DirectPredictor(cfg.neurons, rho=cfg.rho, eps=cfg.eps, backend="torch")
    opt = torch.optim.SGD(groups, lr=cfg.lr)
    V = torch.eye(cfg.d)[:2]  # (2, d): v1, v2
    steps, align, mats, losses = [], [], [], []
    for t in range(cfg.steps + 1):
        x1, x2 = sample_views(cfg, g)
        z1 = _batchnorm(((x1 @ w.T) ** 3).sum(1))  # (B, m)
        z2 = _batchnorm(((x2 @ w.T) ** 3).sum(1))
        if pred is None:
            p1, p2 = z1, z2
        elif head == "direct":
            p1, p2 = pred(torch.cat([z1, z2])).split(cfg.batch)  # both views in one call, as the paper
        else:
            p1, p2 = pred(z1), pred(z2)
        loss = 0.5 * ((p1 - z2.detach()) ** 2).sum(1).mean() + 0.5 * ((p2 - z1.detach()) ** 2).sum(1).mean()
        if t % cfg.log_every == 0 or t == cfg.steps:
            with torch.no_grad():
                steps.append(t)
                align.append(((w @ V.T).abs() / w.norm(dim=1, keepdim=True)).numpy().copy())
                losses.append(loss.item())
                if head == "offdiag":
                    mats.append(pred.matrix.detach().numpy().copy())
                elif head == "direct":
                    mats.append(pred.W.reshape(cfg.neurons, cfg.neurons).numpy().copy())
        if t == cfg.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return RaceResult(head, np.asarray(steps), np.stack(align), np.stack(mats) if mats else None, np.asarray(losses))
