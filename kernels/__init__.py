"""Fused Triton kernels of fastpred, each with a pure-PyTorch reference beside it.

Correlation EMA (`corr_ema.py`):
    corr_ema(F, z, rho, *, first=None, valid=None, mean=None, splits=None) -> F   F <- rho F + (1 - rho) z^T z / N
                                                                         (F (d, d), or (G, m, m) per feature block)
    corr_ema_ref(...)                                                    same, float64 torch
Eigensolver (`eigh.py`):
    eigh_warm(F, U0=None, *, max_sweeps, tol, sweeps_cap) -> (s, U, converged)   warm-started Jacobi, fp32
    eigh_ref(F) -> (s, U)                                                torch.linalg.eigh in float64
Predictor (`predictor.py`):
    predictor_from_eigh(s, U, alpha, eps, *, out=None, floor=1e-4) -> (W, ok)    W = U diag(p) U^T
    predictor_from_eigh_ref(...)
    predictor_newton_schulz(F, eps, *, iters, smax, out, v0, tol) -> (W, ok)      alpha = 1/2, matmul only
    predictor_newton_schulz_ref(F, eps) -> W
    largest_eigenvalue(F, v0=None, iters, *, squarings) -> (smax, v)            for DirectCopy (alpha = 1)
    largest_eigenvalue_ref(F) -> smax

None of them synchronises with the host. On a machine without a GPU the kernels run on CPU tensors
under the Triton interpreter (set TRITON_INTERPRET=1 before triton is first imported).
"""

from .corr_ema import corr_ema, corr_ema_ref
from .eigh import eigh_ref, eigh_warm
from .predictor import (
    largest_eigenvalue,
    largest_eigenvalue_ref,
    predictor_from_eigh,
    predictor_from_eigh_ref,
    predictor_newton_schulz,
    predictor_newton_schulz_ref,
)

__all__ = [
    "corr_ema",
    "corr_ema_ref",
    "eigh_warm",
    "eigh_ref",
    "predictor_from_eigh",
    "predictor_from_eigh_ref",
    "predictor_newton_schulz",
    "predictor_newton_schulz_ref",
    "largest_eigenvalue",
    "largest_eigenvalue_ref",
]
