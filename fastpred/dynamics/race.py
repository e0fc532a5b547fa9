"""A seeded synthetic feature race after Wen and Li (NeurIPS 2022): which features do a few neurons learn?

Modelling choices (THEORY.md marks the setting of Wen and Li as uncertain; these are ours):
- Data: each sample carries ONE feature, v1 (probability p1, amplitude a1) or the weaker v2 (amplitude
  a2), with a random sign, on ``feature_patches`` patches of each of its two views (``patches / 2``
  patches each); every patch has fresh noise, std ``noise`` off span(v1, v2) and ``noise * feature_noise``
  along it, so the views share the feature only. v1, v2 are the first two coordinate vectors.
- Encoder: m neurons f_i(x) = sum over patches of <w_i, x_p>^3, then BatchNorm per output (batch
  statistics, no affine). The noise makes <w, x_p>^3 polynomial-like: its mean on a feature patch is
  (a alpha)^3 + 3 a alpha Var<w, noise>, a linear part while w is unaligned. BatchNorm makes the model
  invariant to the scale of w, so only directions race (``init`` rescales the learning rate).
- Loss: symmetrised 1/2 || BN(head(z1)) - stopgrad(z2) ||^2 per sample, i.e. 2 - 2 corr per neuron,
  SimSiam-style (no EMA target). Without a head the loss is a sum of one term per neuron: each neuron
  races alone, and the strong feature wins. With the head, neuron j's prediction is z_j + sum_i A_ij z_i:
  once some neuron carries v1, A moves to let it supply neuron j's v1 part (substitution); at A's
  optimum the v1 part of neuron j's residual vanishes while its v2 part does not, so j turns to v2
  (acceleration), and A_.j falls back towards zero as j's output stops correlating with v1. The
  BatchNorm after the head (``bn_after_head``) is what lets the head substitute: without it, with the
  diagonal fixed at 1, the off-diagonals' optimum is the cross-view minus the within-view correlation of
  two neurons, which is <= 0 here.
- Heads: none; Wen and Li's identity-initialised head with trainable off-diagonals
  (`fastpred.OffDiagonalPredictor`) at its own learning rate; DirectPred
  (`fastpred.DirectPredictor(backend="torch")`, W from the EMA correlation of the head input).
- ``runs`` independent replicas train side by side (one tensor, one generator): a claim about the race is
  a rate over runs, not one trajectory. Every head sees the same initialisations and the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HEADS = ("none", "offdiag", "direct")
LEARNED = 0.9  # |cos(w_i, v)| above which neuron i counts as having learned feature v


@dataclass(frozen=True)
class RaceConfig:
    """Every field is a flag of ``python -m fastpred.dynamics race`` (underscores become dashes)."""

    d: int = 32  # patch dimension
    patches: int = 16  # patches per sample, half in each view
    feature_patches: int = 2  # patches of each view that carry the sample's feature
    neurons: int = 5  # m
    a1: float = 1.0  # amplitude of the strong feature v1
    a2: float = 0.5  # amplitude of the weak feature v2
    p1: float = 0.5  # probability that a sample carries v1 (else v2)
    noise: float = 0.7  # std of the patch noise off span(v1, v2), on every patch
    feature_noise: float = 0.1  # std of the noise along v1 and v2, relative to ``noise``
    batch: int = 128
    steps: int = 1500
    lr: float = 0.05  # encoder SGD learning rate
    head_lr: float = 0.5  # off-diagonal head learning rate: the head must keep up with the encoder to substitute
    bn_after_head: bool = True  # BatchNorm on the head's output too (without it the head cannot substitute)
    init: float = 1.0  # norm of each w_i at initialisation (random direction)
    rho: float = 0.3  # DirectPred EMA coefficient
    eps: float = 0.1  # DirectPred eps
    runs: int = 8  # independent replicas, trained side by side
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.d < 2 or self.neurons < 1 or self.patches < 2 or self.runs < 1 or self.steps < 0:
            raise ValueError("need d >= 2, neurons >= 1, patches >= 2, runs >= 1, steps >= 0")
        if not 1 <= self.feature_patches <= self.patches // 2:
            raise ValueError(f"feature_patches must be in [1, patches // 2 = {self.patches // 2}], "
                             f"got {self.feature_patches}")
        if not 0.0 <= self.p1 <= 1.0:
            raise ValueError(f"p1 must be a probability, got {self.p1}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


@dataclass
class RaceResult:
    head: str
    steps: np.ndarray  # (T,)
    alignment: np.ndarray  # |cos(w_i, v_j)|, (runs, T, m, 2)
    head_matrix: np.ndarray | None  # W of the head, applied as z @ W, (runs, T, m, m); None without a head
    loss: np.ndarray  # (runs, T)

    def learned(self, feature: int) -> np.ndarray:
        """(runs, m) booleans: the neurons that end on v1 (``feature`` 0) or on v2 (1)."""
        return self.alignment[:, -1, :, feature] > LEARNED

    def outcome(self) -> dict[str, int]:
        """Counts at the last step: neurons on v1, on v2, on neither; runs with a neuron on v2."""
        on_v1, on_v2 = self.learned(0), self.learned(1)
        return {"runs": on_v1.shape[0], "neurons": on_v1.size, "on_v1": int(on_v1.sum()),
                "on_v2": int(on_v2.sum()), "neither": int((~on_v1 & ~on_v2).sum()),
                "runs_with_v2": int(on_v2.any(1).sum())}


def sample_views(cfg: RaceConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views (runs, batch, patches / 2, d) of a fresh batch per run.

    Each sample carries ONE feature: v1 (probability p1, amplitude a1) or v2 (amplitude a2), with a random
    sign, on the first ``feature_patches`` patches of both views (the neurons sum over patches, so the
    position is irrelevant). Every patch of each view gets fresh noise: std ``noise`` off span(v1, v2) and
    ``noise * feature_noise`` along v1 and v2; the views share the feature and nothing else.
    """
    R, B, h, d, k = cfg.runs, cfg.batch, cfg.patches // 2, cfg.d, cfg.feature_patches
    x = cfg.noise * torch.randn(2, R, B, h, d, generator=g)
    x[..., :2] *= cfg.feature_noise
    weak = torch.rand(R, B, generator=g) >= cfg.p1
    sign = torch.randint(0, 2, (R, B), generator=g).to(x.dtype) * 2 - 1
    value = torch.where(weak, cfg.a2, cfg.a1) * sign
    x[..., :k, 0] += torch.where(weak, 0.0, value)[None, :, :, None]
    x[..., :k, 1] += torch.where(weak, value, 0.0)[None, :, :, None]
    return x[0], x[1]


def _batchnorm(f: torch.Tensor) -> torch.Tensor:
    """Per-output normalisation over the batch (dim -2), batch statistics, no affine."""
    return (f - f.mean(-2, keepdim=True)) / (f.std(-2, unbiased=False, keepdim=True) + 1e-6)


def run_race(cfg: RaceConfig, head: str) -> RaceResult:
    """Train ``cfg.runs`` encoders (and heads) with one head kind; the same seed gives every head the same
    initialisations and batches, so a neuron's fate can be compared across heads."""
    import fastpred  # the heads; imported here so the ODE parts of fastpred.dynamics load without them

    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    g = torch.Generator().manual_seed(cfg.seed)
    w = torch.randn(cfg.runs, cfg.neurons, cfg.d, generator=g)
    w = (cfg.init * w / w.norm(dim=-1, keepdim=True)).requires_grad_()
    groups = [{"params": [w], "lr": cfg.lr}]
    heads = []  # one product module per run: the race exercises the real predictors
    if head == "offdiag":
        heads = [fastpred.OffDiagonalPredictor(cfg.neurons) for _ in range(cfg.runs)]
        groups.append({"params": [p for h in heads for p in h.parameters()], "lr": cfg.head_lr})
    elif head == "direct":
        heads = [fastpred.DirectPredictor(cfg.neurons, rho=cfg.rho, eps=cfg.eps, backend="torch")
                 for _ in range(cfg.runs)]
    opt = torch.optim.SGD(groups, lr=cfg.lr)
    V = torch.eye(cfg.d)[:2]  # (2, d): v1, v2
    steps, align, mats, losses = [], [], [], []
    for t in range(cfg.steps + 1):
        x1, x2 = sample_views(cfg, g)
        z1 = _batchnorm(((x1 @ w.unsqueeze(1).mT) ** 3).sum(2))  # (runs, B, m)
        z2 = _batchnorm(((x2 @ w.unsqueeze(1).mT) ** 3).sum(2))
        if head == "none":
            p1, p2 = z1, z2
        elif head == "direct":  # both views in one call, as the paper
            both = torch.cat([z1, z2], 1)  # (runs, 2B, m)
            p1, p2 = torch.stack([h(zr) for h, zr in zip(heads, both, strict=True)]).split(cfg.batch, 1)
        else:
            p1 = torch.stack([h(zr) for h, zr in zip(heads, z1, strict=True)])
            p2 = torch.stack([h(zr) for h, zr in zip(heads, z2, strict=True)])
        if cfg.bn_after_head:
            p1, p2 = _batchnorm(p1), _batchnorm(p2)  # the loss is then 2 - 2 corr per neuron
        per_run = (0.5 * ((p1 - z2.detach()) ** 2).sum(-1).mean(-1)
                   + 0.5 * ((p2 - z1.detach()) ** 2).sum(-1).mean(-1))  # (runs,)
        if t % cfg.log_every == 0 or t == cfg.steps:
            with torch.no_grad():
                steps.append(t)
                align.append(((w @ V.T).abs() / w.norm(dim=-1, keepdim=True)).numpy().copy())
                losses.append(per_run.numpy().copy())
                if head == "offdiag":
                    mats.append(np.stack([h.matrix.detach().numpy() for h in heads]))
                elif head == "direct":
                    mats.append(np.stack([h.W.reshape(cfg.neurons, cfg.neurons).numpy() for h in heads]))
        if t == cfg.steps:
            break
        opt.zero_grad(set_to_none=True)
        per_run.sum().backward()  # runs share no parameter: each gets its own gradient
        opt.step()
    return RaceResult(head, np.asarray(steps), np.stack(align, 1), np.stack(mats, 1) if mats else None,
                      np.stack(losses, 1))
