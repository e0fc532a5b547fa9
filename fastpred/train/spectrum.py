"""What the predictor sees and does, every `every` steps: the spectra behind the paper's Fig. 2.

Symbols (Tian, Chen, Ganguli, ICML 2021; THEORY.md):
    z     the predictor input of a step, (N, d): both views' projector outputs, detached
    F     correlation of z: the DirectPredictor's own EMA, or z^T z / N of the step for other heads
    s, U  eigenvalues (descending) and unit eigenvectors u_j of F
    W     the linear predictor as applied, ``z @ W``; on column vectors it acts as M = W^T
    cos_j alignment cos(u_j, M u_j) = u_j^T M u_j / ||M u_j||, 0 where M u_j = 0

The recorder runs only on record steps (``step % every == 0``); every other call returns at once without
touching z, the predictor or the device, so the training step keeps never waiting on the host.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastpred.core.files import atomic_file
from fastpred.direct import DirectPredictor
from fastpred.trained import LinearPredictor, OffDiagonalPredictor

#: Arrays of `spectrum.npz`, one row per record step; those that are not defined for a run are left out.
ARRAYS = ("step", "f_eigs", "w_eigs", "asymmetry", "alignment", "effective_rank")

# Collapse alarm: an effective rank near 1 means F's spectrum is essentially one direction: the complete
# collapse that the predictor and stop-gradient exist to prevent. It is a fixed number, not a fraction of d,
# because a healthy run's spectrum is steep (the paper's Fig. 2: many eigenvalues of F shrink towards 0 while
# a few grow), so a threshold that grew with d would fire on healthy wide projectors. Measured on the digits
# preset (d = 64): healthy DirectPred runs pass through 1.6 early on before ending at 4.6-8, while SimSiam
# without a predictor ends at 1.02 (output std 0.045) and with a trained linear head at 1.17 (std 0.13);
# 2.0 fired on the healthy runs, 1.25 separates them.
DEFAULT_RANK_ALARM = 1.25


class SpectrumRecorder:
    """Records F's eigenvalues and, for a linear predictor W, W's eigenvalues, asymmetry and alignment.

    Args:
        dim: feature dimension d of z.
        every: record on steps with ``step % every == 0``; 0 disables recording.
        rank_alarm: warn (once, ``RuntimeWarning``) the first time F's effective rank falls below this;
            <= 0 never warns.
        rho: accepted for the trainer's interface and kept in the state, but not used. For a
            `DirectPredictor` F is the predictor's own EMA (its own rho). For other heads F is the
            correlation of the record step's batch alone, not an EMA: an EMA would need device work on
            every step, which the recorder must not do between record steps.

    F comes from ``predictor.F`` when the predictor is a `DirectPredictor` (the EMA it sets W from; its
    G feature blocks' eigenvalues are concatenated), otherwise from z. Under torch.distributed the
    per-batch F is the local rank's. All eigendecompositions run in float64 on z's device; the stored
    arrays are float32.
    """

    def __init__(self, dim: int, *, every: int, rank_alarm: float = DEFAULT_RANK_ALARM, rho: float = 0.3) -> None:
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if not (isinstance(every, int) and every >= 0):
            raise ValueError(f"every must be an integer >= 0 (0 disables), got {every!r}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {rho!r}")
        self.dim, self.every, self.rank_alarm, self.rho = dim, every, float(rank_alarm), float(rho)
        self.alarm_fired = False
        self.f_source: str | None = None  # "ema" (DirectPredictor's F) or "batch" (z^T z / N of the step)
        self._rows: dict[str, list] = {name: [] for name in ARRAYS}

    def __len__(self) -> int:
        return len(self._rows["step"])

    def observe(self, step: int, z: torch.Tensor, predictor: nn.Module | None) -> dict[str, float] | None:
        """Record on record steps and return scalars for the metrics line; on any other step return None
        at once, without touching ``z`` or ``predictor`` (no device work, no host synchronisation)."""
        if self.every <= 0 or step % self.every != 0:
            return None
        with torch.no_grad():
            row = _measure(z, _unwrap(predictor))
        if len(row["f_eigs"]) != self.dim:
            raise ValueError(f"SpectrumRecorder has dim {self.dim} but F at step {step} is {len(row['f_eigs'])}-dim")
        self.f_source = row.pop("f_source")
        self._rows["step"].append(int(step))
        for name in ARRAYS[1:]:
            value = row.get(name)
            self._rows[name].append(None if value is None else np.asarray(value, dtype=np.float32))
        rank = float(row["effective_rank"])
        if not self.alarm_fired and rank < self.rank_alarm:  # NaN (an all-zero F) compares False
            self.alarm_fired = True
            warnings.warn(
                f"possible collapse: effective rank of F is {rank:.3g} < {self.rank_alarm:g} at step {step}",
                RuntimeWarning,
                stacklevel=2,
            )
        s = row["f_eigs"]
        metrics = {"effective_rank": rank, "f_eig_max": float(s[0]), "f_eig_min": float(s[-1])}
        if row.get("asymmetry") is not None:
            metrics["asymmetry"] = float(row["asymmetry"])
        return metrics

    def records_since(self, n: int) -> list[tuple[int, np.ndarray]]:
        """(step, eigenvalues of F) of every record after the first `n`."""
        return list(zip(self._rows["step"][n:], self._rows["f_eigs"][n:], strict=True))

    def arrays(self) -> dict[str, np.ndarray]:
        """The records so far as `spectrum.npz` holds them (arrays never recorded are left out)."""
        out: dict[str, np.ndarray] = {"step": np.asarray(self._rows["step"], dtype=np.int64)}
        for name in ARRAYS[1:]:
            values = self._rows[name]
            if not values or all(v is None for v in values):
                continue
            width = None if name in ("asymmetry", "effective_rank") else self.dim
            blank = np.float32(np.nan) if width is None else np.full(width, np.nan, dtype=np.float32)
            out[name] = np.stack([blank if v is None else v for v in values]).astype(np.float32)
        if self.f_source is not None:
            out["f_source"] = np.asarray(self.f_source)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the records to ``path`` (a compressed .npz) atomically: a temporary file, then os.replace."""
        path = Path(path)
        with atomic_file(path) as f:
            np.savez_compressed(f, **self.arrays())  # a file object: numpy adds no ".npz" of its own
        return path

    def state_dict(self) -> dict:
        """Plain tensors, lists and scalars (loadable with ``torch.load(weights_only=True)``)."""
        state: dict = {
            "dim": self.dim,
            "every": self.every,
            "rank_alarm": self.rank_alarm,
            "rho": self.rho,
            "alarm_fired": self.alarm_fired,
            "f_source": self.f_source or "",
        }
        for name, array in self.arrays().items():
            if name != "f_source":
                state[name] = torch.from_numpy(array)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue the arrays of a checkpointed recorder (same dim); the alarm does not fire twice."""
        if int(state["dim"]) != self.dim:
            raise ValueError(f"SpectrumRecorder state is for dim {state['dim']}, this recorder has dim {self.dim}")
        self.alarm_fired = bool(state["alarm_fired"])
        self.f_source = state["f_source"] or None
        steps = [int(s) for s in state["step"].tolist()]
        self._rows = {"step": steps}
        for name in ARRAYS[1:]:
            if name not in state:
                self._rows[name] = [None] * len(steps)
                continue
            values = state[name].numpy()
            # A row of NaN is a record where the array was not defined (see `arrays`).
            self._rows[name] = [None if np.isnan(v).all() else v for v in values]


def load_spectrum(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `spectrum.npz` written by `SpectrumRecorder.save`; never unpickles (safe on a received file)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def effective_rank(s: torch.Tensor) -> float:
    """exp of the entropy of the eigenvalues clamped at 0 and normalised to sum 1; NaN if they sum to 0."""
    p = s.clamp(min=0)
    total = p.sum()
    if not (torch.isfinite(total) and total > 0):
        return math.nan
    p = p / total
    entropy = -(p * torch.log(torch.where(p > 0, p, 1.0))).sum()
    return float(torch.exp(entropy))


def _unwrap(module: nn.Module | None) -> nn.Module | None:
    """The predictor inside DistributedDataParallel (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def _linear_map(predictor: nn.Module | None) -> torch.Tensor | None:
    """The matrix W with ``output = z @ W``, as (G, m, m) feature blocks; None for a non-linear head or none."""
    if isinstance(predictor, DirectPredictor):
        return predictor.W.detach()
    if isinstance(predictor, LinearPredictor):
        return predictor.linear.weight.detach().T.unsqueeze(0)  # forward is z @ weight^T
    if isinstance(predictor, OffDiagonalPredictor):
        return predictor.matrix.detach().unsqueeze(0)
    return None


def _measure(z: torch.Tensor, predictor: nn.Module | None) -> dict:
    """One record: F's spectrum, and W's where W is linear. Host synchronisation happens here only."""
    if isinstance(predictor, DirectPredictor):
        F, source = predictor.F.detach().double(), "ema"  # (G, m, m)
    else:
        z = z.detach().double()
        F, source = (z.T @ z / z.shape[0]).unsqueeze(0), "batch"  # (1, d, d)
    W = _linear_map(predictor)
    row: dict = {"f_source": source}
    if not torch.isfinite(F).all():
        d = F.shape[0] * F.shape[1]
        row.update(f_eigs=np.full(d, np.nan), effective_rank=math.nan)
        return row
    s, U = torch.linalg.eigh(F)  # ascending per block: (G, m), (G, m, m)
    order = torch.argsort(s.flatten(), descending=True, stable=True)
    s_all = s.flatten()[order]
    row["f_eigs"] = s_all.cpu().numpy()
    row["effective_rank"] = effective_rank(s_all)
    if W is None:
        return row
    W = W.double().to(F.device)
    if not torch.isfinite(W).all():
        nan = np.full(s_all.numel(), np.nan)
        row.update(w_eigs=nan, alignment=nan, asymmetry=math.nan)
        return row
    WT = W.mT
    norm = torch.linalg.matrix_norm(W).square().sum().sqrt()  # ||W||_F over the blocks: (G,) -> ()
    skew = torch.linalg.matrix_norm(W - WT).square().sum().sqrt()
    row["asymmetry"] = float(skew / norm) if norm > 0 else math.nan
    row["w_eigs"] = torch.linalg.eigvalsh((W + WT) / 2).flatten().sort(descending=True).values.cpu().numpy()
    MU = WT @ U  # column j: M u_j, with M = W^T the map on column vectors
    length = torch.linalg.vector_norm(MU, dim=-2)  # (G, m)
    along = (U * MU).sum(dim=-2)  # u_j^T M u_j
    cos = torch.where(length > 0, along / torch.where(length > 0, length, 1.0), 0.0)
    row["alignment"] = cos.flatten()[order].cpu().numpy()
    return row
