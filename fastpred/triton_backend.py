"""DirectPredictor's Triton backend: fused correlation EMA, warm-started Jacobi eigensolver, fused W.

Every decision is made on the device (flags and sweep caps are read by the kernels, results are kept
or dropped with `torch.where`), so a training step never waits on the host and can be captured in a
CUDA graph. The price of that: on steps that do not refresh W (``freq > 1``) the solver still runs,
with a sweep cap of 0, and its result is discarded.
"""

from __future__ import annotations

import torch

from fastpred.kernels import corr_ema, eigh_warm, largest_eigenvalue, predictor_from_eigh
from fastpred.kernels._launch import interpreted
from fastpred.torch_backend import diagonal_is_finite

#: Sweeps allowed on the first (cold) refresh and on the one after a non-converged solve (a cold
#: 32 x 32 solve converges in about 10).
#: Also the launch budget of the block solver for d / groups > 64, where sweeps past convergence are
#: launched as no-ops (each kernel reads a device flag and returns).
FULL_SWEEPS = 12


def check_device(device: torch.device) -> None:
    """One ValueError line unless the kernels can run on `device`: CUDA, or any device when they were decorated
    by Triton's interpreter (TRITON_INTERPRET=1 set before triton was imported). Nothing here sets it."""
    if device.type != "cuda" and not interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run on "
            f"{device.type} tensors; got {device.type} tensors"
        )


def grouped_gram(z: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum of outer products per feature block: (N, G*m) -> (G, m, m), by the fused kernel (one launch)."""
    n, d = z.shape
    C = torch.zeros(groups, d // groups, d // groups, dtype=torch.float32, device=z.device)
    corr_ema(C, z, 0.0)  # rho = 0: C[g] <- z_g^T z_g / N
    return C * n


def fold_(F: torch.Tensor, z: torch.Tensor, rho: float, first: torch.Tensor) -> torch.Tensor:
    """F <- z^T z / N on the first fold, rho F + (1 - rho) z^T z / N after it, unless the result is non-finite.

    The kernel folds into a copy, so a batch with a NaN, an inf, or an fp32 overflow in z^T z is
    dropped whole (returns valid = False, 0-dim bool) and F is never poisoned.
    """
    folded = F.clone()
    corr_ema(folded, z, rho, first=first)  # every feature block in one launch
    valid = diagonal_is_finite(folded)
    F.copy_(torch.where(valid, folded, F))
    return valid


def refresh_predictor_(
    F: torch.Tensor,
    U: torch.Tensor,
    W: torch.Tensor,
    full_solve_next: torch.Tensor,
    unconverged: torch.Tensor,
    *,
    enable: torch.Tensor,
    alpha: float,
    eps: float,
    floor: float,
    sweeps: int,
) -> None:
    """Recompute W (G, m, m) from F where the 0-dim device flag `enable` is set; nothing waits on the host.

    A refresh whose eigensolve has not converged within its sweep cap still sets W from the best basis
    it reached, is counted in `unconverged` and marks the block in `full_solve_next`, so that the next
    refresh of that block runs with FULL_SWEEPS (as does the first, cold, solve). A block whose result
    is non-finite or whose largest eigenvalue is not positive keeps its W and U. DirectCopy (alpha = 1,
    eps >= floor) needs only max s.
    """
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    if alpha == 1.0 and eps >= floor:
        s_max, _ = largest_eigenvalue(F)  # (G,)
        new_W = F / s_max[:, None, None] + eps * eye
        ok = enable & torch.isfinite(s_max) & (s_max > 0) & torch.isfinite(new_W).all(dim=(-2, -1))
        W.copy_(torch.where(ok[:, None, None], new_W, W))
        return
    cap = torch.where(full_solve_next, FULL_SWEEPS, sweeps)
    cap = torch.where(enable, cap, 0).to(torch.int32)  # (G,)
    s, basis, converged = eigh_warm(F, U, max_sweeps=max(FULL_SWEEPS, sweeps), sweeps_cap=cap)
    new_W, finite = predictor_from_eigh(s, basis, alpha, eps, floor=floor)
    ok = (enable & finite)[:, None, None]
    W.copy_(torch.where(ok, new_W, W))
    U.copy_(torch.where(ok, basis, U))
    failed = enable & ~converged
    unconverged += failed.sum()
    full_solve_next.copy_(torch.where(enable, failed, full_solve_next))
