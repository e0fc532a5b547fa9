"""DirectPredictor's Triton backend: fused correlation EMA, warm-started eigensolver (Jacobi, or orthogonal
iteration + Jacobi), fused W.

Every decision is made on the device (flags and sweep caps are read by the kernels, results are kept
or dropped with `torch.where`), so a training step never waits on the host and can be captured in a
CUDA graph. The price of that: on steps that do not refresh W (``freq > 1``) the solver still runs,
with a sweep cap of 0, and its result is discarded.
"""

from __future__ import annotations

import torch

from fastpred.kernels import corr_ema, eigh_warm, largest_eigenvalue, orth_iter, predictor_from_eigh
from fastpred.kernels._launch import interpreted
from fastpred.kernels.eigh import _SMALL_MAX as REGISTER_MAX_N
from fastpred.torch_backend import diagonal_is_finite

#: Sweeps allowed on the first (cold) refresh and on the one after a non-converged solve, for d / groups > 64,
#: where it is also the block solver's launch budget: sweeps past convergence are launched as no-ops (each kernel
#: reads a device flag and returns), so every refresh pays for them.
FULL_SWEEPS = 12
#: The same for d / groups <= 64, where the sweep loop runs on the device and headroom costs nothing until used:
#: a cold 64 x 64 solve took 9 to 10 sweeps on the bench streams and 12 on a spectrum of condition 1e9 from bf16
#: features (tests/test_direct_predictor_autocast.py), exactly the old shared budget of 12.
REGISTER_FULL_SWEEPS = 24
#: Orthogonal iterations before the Rayleigh-Ritz (Jacobi) step of solver="orth" on a warm refresh. Measured with
#: the pure-PyTorch references (docs/kernels.md): on the bench stream one iteration cut the Jacobi sweeps after it
#: from 3.5-5.1 to 2.6-4.0 a refresh (two: 2.4-4.0), on a fast-moving F (N = 2d, rho 0.3, condition 5e7-2e9) the first
#: warm refresh from 9 to 5 (two: 4); interpreted, an iteration costs as many operations as 1.3-1.6 sweeps.
ORTH_ITERS = 1
SOLVERS = ("jacobi", "orth")


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
    solver: str = "jacobi",
    filter: str = "power",
    scale: float | None = None,
) -> None:
    """Recompute W (G, m, m) from F where the 0-dim device flag `enable` is set; nothing waits on the host.

    solver "jacobi": Jacobi sweeps from the previous basis U. "orth" (m <= 64): ORTH_ITERS orthogonal iterations
    Q <- qr(F Q) from U, then the Rayleigh-Ritz step, Jacobi sweeps on Q^T F Q under the same cap and test.
    A refresh whose eigensolve has not converged within its sweep cap still sets W from the best basis
    it reached, is counted in `unconverged` and marks the block in `full_solve_next`, so that the next
    refresh of that block is a full solve (as is the first, cold, one): Jacobi alone with FULL_SWEEPS
    (REGISTER_FULL_SWEEPS for m <= 64) for either solver. A block whose result is non-finite or whose largest
    eigenvalue is not positive keeps its W and U. DirectCopy (alpha = 1, eps >= floor) needs only max s. A log
    `filter` (with its `scale`) is applied to the eigenvalues by the construction kernel (`predictor_from_eigh`).
    """
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    if filter == "power" and alpha == 1.0 and eps >= floor:
        s_max, _ = largest_eigenvalue(F)  # (G,)
        new_W = F / s_max[:, None, None] + eps * eye
        ok = enable & torch.isfinite(s_max) & (s_max > 0) & torch.isfinite(new_W).all(dim=(-2, -1))
        W.copy_(torch.where(ok[:, None, None], new_W, W))
        return
    full = REGISTER_FULL_SWEEPS if F.shape[-1] <= REGISTER_MAX_N else FULL_SWEEPS
    cap = torch.where(full_solve_next, full, sweeps)
    cap = torch.where(enable, cap, 0).to(torch.int32)  # (G,)
    start = U
    if solver == "orth":
        iters = torch.where(enable & ~full_solve_next, ORTH_ITERS, 0).to(torch.int32)
        _, start, _ = orth_iter(F, U, max_iters=ORTH_ITERS, iters_cap=iters)
    s, basis, converged = eigh_warm(F, start, max_sweeps=max(full, sweeps), sweeps_cap=cap)
    new_W, finite = predictor_from_eigh(s, basis, alpha, eps, floor=floor, filter=filter, scale=scale)
    ok = (enable & finite)[:, None, None]
    W.copy_(torch.where(ok, new_W, W))
    U.copy_(torch.where(ok, basis, U))
    failed = enable & ~converged
    unconverged += failed.sum()
    full_solve_next.copy_(torch.where(enable, failed, full_solve_next))
