"""Fused Triton kernels of fastpred, each with a pure-PyTorch reference beside it.

Correlation EMA (`corr_ema.py`):
    corr_ema(F, z, rho, *, first=None, valid=None, mean=None, splits=None) -> F   F <- rho F + (1 - rho) z^T z / N
                                                                         (F (d, d), or (G, m, m) per feature block)
    corr_ema_ref(...)                                                    same, float64 torch
Eigensolver (`eigh.py`):
    eigh_warm(F, U0=None, *, max_sweeps, tol, sweeps_cap) -> (s, U, converged)   warm-started Jacobi, fp32
    eigh_ref(F) -> (s, U)                                                torch.linalg.eigh in float64
    jacobi_ref(F, U0=None, *, max_sweeps, tol, dtype) -> (s, U, converged, sweeps)   the same Jacobi, plain torch
Orthogonal iteration (`orth_iter.py`), the power/QR route:
    orth_iter(F, U0=None, *, max_iters, tol, iters_cap) -> (s, Q, converged)   Q <- qr(F Q), Householder, fp32
    orth_iter_ref(F, U0=None, *, max_iters, tol, dtype) -> (s, Q, converged)   same, plain torch
Predictor (`predictor.py`):
    predictor_from_eigh(s, U, alpha, eps, *, out=None, floor=1e-4, filter="power", scale=None) -> (W, ok)
                                                                         W = U diag(p) U^T, p a filter of s
    predictor_from_eigh_ref(...)
    predictor_newton_schulz(F, eps, *, iters, smax, out, v0, tol) -> (W, ok)      alpha = 1/2, matmul only
    predictor_newton_schulz_ref(F, eps) -> W
    largest_eigenvalue(F, v0=None, iters, *, squarings) -> (smax, v)            for DirectCopy (alpha = 1)
    largest_eigenvalue_ref(F) -> smax

None of them synchronises with the host. This package is the bottom layer of fastpred: it imports torch and
triton only. Its submodules load on first use, so `fastpred` (which takes torch-only helpers from
`_common.py`) imports without triton. On a machine without a GPU the kernels run on CPU tensors under the
Triton interpreter: set TRITON_INTERPRET=1 before they are first used; otherwise a launch on a CPU tensor
raises a ValueError.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "corr_ema": "corr_ema",
    "corr_ema_ref": "corr_ema",
    "eigh_warm": "eigh",
    "eigh_ref": "eigh",
    "jacobi_ref": "eigh",
    "orth_iter": "orth_iter",
    "orth_iter_ref": "orth_iter",
    "predictor_from_eigh": "predictor",
    "predictor_from_eigh_ref": "predictor",
    "predictor_newton_schulz": "predictor",
    "predictor_newton_schulz_ref": "predictor",
    "largest_eigenvalue": "predictor",
    "largest_eigenvalue_ref": "predictor",
}
__all__ = [
    "corr_ema",
    "corr_ema_ref",
    "eigh_warm",
    "eigh_ref",
    "jacobi_ref",
    "orth_iter",
    "orth_iter_ref",
    "predictor_from_eigh",
    "predictor_from_eigh_ref",
    "predictor_newton_schulz",
    "predictor_newton_schulz_ref",
    "largest_eigenvalue",
    "largest_eigenvalue_ref",
]

if TYPE_CHECKING:
    from .corr_ema import corr_ema, corr_ema_ref
    from .eigh import eigh_ref, eigh_warm, jacobi_ref
    from .orth_iter import orth_iter, orth_iter_ref
    from .predictor import (
        largest_eigenvalue,
        largest_eigenvalue_ref,
        predictor_from_eigh,
        predictor_from_eigh_ref,
        predictor_newton_schulz,
        predictor_newton_schulz_ref,
    )


def _load() -> None:
    """Import the kernel modules (and triton) and bind their public functions here. Binding after the imports
    matters: importing the submodule `corr_ema` sets this package's attribute `corr_ema` to the module."""
    modules = {name: importlib.import_module(f".{name}", __name__) for name in set(_EXPORTS.values())}
    globals().update({name: getattr(modules[module], name) for name, module in _EXPORTS.items()})


def __getattr__(name: str):
    if name in _EXPORTS:  # first use (PEP 562)
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
