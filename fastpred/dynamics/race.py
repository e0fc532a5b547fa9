"""A seeded synthetic feature race after Wen and Li (NeurIPS 2022): which features do a few neurons learn?

Modelling choices (THEORY.md marks the setting of Wen and Li as uncertain; these are ours):
- Data: each sample carries ONE feature, v1 (probability p1, amplitude a1) or the weaker v2 (amplitude
  a2), with a random sign, on ``feature_patches`` patches of each of its two views (``patches / 2``
  patches each); every patch has fresh noise, std ``noise`` off span(v1, v2) and ``noise * feature_noise``
  along it, so the views share the feature only. v1, v2 are the first two coordinate vectors.
- Encoder: m neurons f_i(x) = sum over patches of <w_i, x_p>^3, then BatchNorm per output (batch
  statistics, no affine). The noise makes <w, x_p>^3 polynomial-like: its mean on a feature patch is
  (a alpha)^3 + 3 a alpha Var<w, noise>, a linear part while w is unaligned.
- Loss: symmetrised 1/2 || BN(head(z1)) - stopgrad(z2) ||^2 per sample, i.e. 2 - 2 corr per neuron,
  SimSiam-style (no EMA target). The BatchNorm after the head (``bn_after_head``) is what lets the head
  substitute: without it, with the head's diagonal fixed at 1, the off-diagonals' optimum is the
  cross-view minus the within-view correlation of two neurons, which is <= 0 here.
- Heads: none; Wen and Li's identity-initialised head with trainable off-diagonals
  (`fastpred.OffDiagonalPredictor`) at its own learning rate; DirectPred
  (`fastpred.DirectPredictor(backend="torch")`, W from the EMA correlation of the head input).
- Result (README, Dynamics): no head collapses every neuron onto v1 (5 of 5 seeds); the off-diagonal head
  reproduces the substitution-acceleration sequence in 1 of 5 seeds (seed 3, the default) and otherwise
  ends with both neurons on v1 and W ~ [[1, 1], [1, 1]]; with head_lr 0.02 < lr it did in none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HEADS = ("none", "offdiag", "direct")


@dataclass(frozen=True)
class RaceConfig:
    """Every field is a flag of ``python -m fastpred.dynamics race`` (underscores become dashes)."""

    d: int = 16  # patch dimension
    patches: int = 16  # patches per sample, half in each view
    feature_patches: int = 2  # patches of each view that carry the sample's feature
    neurons: int = 2  # m
    a1: float = 1.0  # amplitude of the strong feature v1
    a2: float = 0.5  # amplitude of the weak feature v2
    p1: float = 0.5  # probability that a sample carries v1 (else v2)
    noise: float = 0.7  # std of the patch noise off span(v1, v2), on every patch
    feature_noise: float = 0.3  # std of the noise along v1 and v2, relative to ``noise``
    batch: int = 128
    steps: int = 800
    lr: float = 0.05  # encoder SGD learning rate
    head_lr: float = 0.2  # off-diagonal head learning rate (above lr: with a smaller one the head never substitutes)
    bn_after_head: bool = True  # BatchNorm on the head's output too (without it the head cannot substitute)
    init: float = 1.0  # norm of each w_i at initialisation (random direction)
    rho: float = 0.3  # DirectPred EMA coefficient
    eps: float = 0.1  # DirectPred eps
    seed: int = 3  # one of the 1-in-5 seeds where the off-diagonal head reproduces Wen and Li (README)
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.d < 2 or self.neurons < 1 or self.patches < 2:
            raise ValueError("need d >= 2, neurons >= 1, patches >= 2")
        if not 1 <= self.feature_patches <= self.patches // 2:
            raise ValueError(f"feature_patches must be in [1, patches // 2 = {self.patches // 2}], "
                             f"got {self.feature_patches}")
        if not 0.0 <= self.p1 <= 1.0:
            raise ValueError(f"p1 must be a probability, got {self.p1}")


@dataclass
class RaceResult:
    head: str
    steps: np.ndarray  # (T,)
    alignment: np.ndarray  # |cos(w_i, v_j)|, (T, m, 2)
    head_matrix: np.ndarray | None  # W of the head, (T, m, m); None without a head
    loss: np.ndarray  # (T,)


def sample_views(cfg: RaceConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views (batch, patches / 2, d) of a fresh batch.

    Each sample carries ONE feature: v1 (probability p1, amplitude a1) or v2 (amplitude a2), with a random
    sign, on the first ``feature_patches`` patches of both views (the neurons sum over patches, so the
    position is irrelevant). Every patch of each view gets fresh noise: std ``noise`` off span(v1, v2) and
    ``noise * feature_noise`` along v1 and v2; the views share the feature and nothing else.
    """
    B, h, d, k = cfg.batch, cfg.patches // 2, cfg.d, cfg.feature_patches
    x = cfg.noise * torch.randn(2, B, h, d, generator=g)
    x[..., :2] *= cfg.feature_noise
    weak = torch.rand(B, generator=g) >= cfg.p1
    sign = torch.randint(0, 2, (B,), generator=g).to(x.dtype) * 2 - 1
    value = torch.where(weak, cfg.a2, cfg.a1) * sign
    x[:, :, :k, 0] += torch.where(weak, 0.0, value)[None, :, None]
    x[:, :, :k, 1] += torch.where(weak, value, 0.0)[None, :, None]
    return x[0], x[1]


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
        if cfg.bn_after_head:
            p1, p2 = _batchnorm(p1), _batchnorm(p2)  # the loss is then 2 - 2 corr per neuron
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
