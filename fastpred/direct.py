"""`DirectPredictor`: the DirectPred predictor head, set from feature statistics instead of trained.

Symbols (Tian, Chen, Ganguli, ICML 2021), defined once:
    z     predictor input, (N, d)
    F     moving average of the correlation z^T z / N, (d, d), fp32
    s, U  eigenvalues and eigenvectors of F
    W     the predictor, U diag(p) U^T with p = max((clamp(s, 0) / max s) ** alpha + eps, 1e-4)
The full contract is in DESIGN.md ("The numerical contract of DirectPredictor").
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.distributed as dist
from torch import nn

from fastpred import torch_backend
from fastpred.alerts import CounterAlert
from fastpred.kernels._common import FILTERS

#: Lower bound on every eigenvalue p of W (part of the DirectPred contract).
P_FLOOR = 1e-4
BACKENDS = ("auto", "torch", "triton")
#: The triton backend's eigensolvers (fastpred.triton_backend.SOLVERS, without importing triton here).
SOLVERS = ("jacobi", "orth")
#: Largest block d / groups of solver="orth" (its kernel holds a block in registers).
ORTH_MAX_BLOCK = 64


class DirectPredictor(nn.Module):
    """Linear predictor W set directly from the eigendecomposition of the EMA correlation F of its inputs.

    A drop-in replacement for BYOL/SimSiam's trained predictor head: ``forward(z)`` returns ``z @ W``
    with W as it was before the call; in training mode the call then folds ``z.detach()`` into F and,
    after every ``freq``-th fold, recomputes W. Before any statistics W is the identity. In eval mode
    nothing is folded. Pass both views in one call (``pred(torch.cat([z1, z2]))``) to match the paper.

    Args:
        dim: feature dimension d of the input z (N, d).
        rho: EMA coefficient of F, in [0, 1): F <- rho F + (1 - rho) z^T z / N. The first fold sets F.
        eps: added to every normalised eigenvalue; >= 0. ``rho=0.3, eps=0.1`` are the paper's best
            setting on STL-10 (77.86% linear probe, ResNet-18, 100 epochs).
        alpha: exponent on the normalised eigenvalues, > 0. 0.5 is DirectPred; 1 is DirectCopy
            (W = F / max s + eps I), which needs only the largest eigenvalue, not a full eigh.
        freq: recompute W after every ``freq``-th fold (>= 1).
        filter: the function g of F's spectrum in W = U diag(p) U^T. ``"power"`` (default): DirectPred's
            p = (s / max s) ** alpha + eps. The log filters of Zhuo et al. (ICLR 2023, rank differential mechanism)
            act on sigma = sqrt(filter_scale * s), the singular values of a batch of ``filter_scale`` rows with
            correlation F: ``"log"`` log sigma, ``"log1p"`` log(1 + sigma), ``"log1p_sq"`` log(1 + sigma^2), each
            normalised by its value at max s: p = max(g(sigma) / g(sigma_max) + eps, 1e-4) (``alpha`` unused).
            Their polynomial filter sigma ** k is ``"power"`` with alpha = k / 2.
        filter_scale: the rows N in sigma^2 = N s, > 0; required by the log filters (ignored by ``"power"``). The
            authors' code takes the SVD of one view's global batch, so theirs is the global batch size per view.
        trainable: make W an ``nn.Parameter`` trained by gradient between refreshes, each refresh
            resetting it from F (the paper's ``freq > 1`` variant). Off by default: W is a buffer.
        groups: split the features into ``groups`` contiguous blocks of d / groups and give each its
            own F and W (a block-diagonal predictor); the blocks are solved as one batch.
        backend: ``"torch"`` (fp32 statistics, ``torch.linalg.eigh``), ``"triton"`` (fused kernels and a
            warm-started Jacobi eigensolver; no host synchronisation, CUDA-graph capturable), or
            ``"auto"``: triton on CUDA, torch on the CPU. ``"triton"`` runs on CPU tensors only under
            ``TRITON_INTERPRET=1`` (Triton's interpreter: for tests, not speed).
        sweeps: the triton backend's Jacobi sweep cap per refresh, starting from the previous
            eigenbasis (on a drifting stream at rho = 0.3, d = 32, the off-diagonal mass fell below
            the solver's tolerance in 4 to 6 sweeps). A solve that has not converged within it is
            counted in ``unconverged_solves``, warned about once, and the next refresh of that block
            runs with a larger cap.
        solver: the triton backend's eigensolver on warm refreshes: ``"jacobi"`` (default), or ``"orth"``: one
            orthogonal iteration Q <- qr(F Q) (Householder, fp32) from the previous eigenbasis, then Jacobi sweeps
            on Q^T F Q (the Rayleigh-Ritz step) under the same cap and convergence test; d / groups <= 64 only.
            The design's power/QR route, kept as an option: on the bench stream the iteration costs more than the
            sweeps it saves; it helps where F moves far between refreshes (docs/kernels.md). Cold and repair
            solves are Jacobi for both. Ignored where no eigensolver runs (the torch backend, DirectCopy).
        process_group: under torch.distributed, F is computed over the global batch of this group
            (all-reduce of z^T z and N), so every rank holds the same F and W. Default: the world.

    State (all registered buffers, so ``state_dict`` round-trips a run exactly; W is a parameter when
    ``trainable``): ``F`` and ``W`` of shape (groups, d / groups, d / groups), the eigenbasis ``U`` of the
    last refresh (the warm start of the next), the counters ``num_folds``, ``skipped_updates`` and
    ``unconverged_solves``, and ``full_solve_next`` (groups,), the blocks whose next solve gets the full
    sweep budget (before the first solve, and after one that did not converge).

    A batch with a non-finite value is not folded (F and W unchanged); it is counted in
    ``skipped_updates`` and warned about once. On CUDA the warning comes a step or two late: it is read
    from the device without making the step wait.

    The torch backend reads one flag per training step on the host (whether to run eigh), which on CUDA
    is a synchronisation; ``torch.linalg.eigh`` synchronises there anyway. The triton backend never waits.
    """

    def __init__(
        self,
        dim: int,
        *,
        rho: float = 0.3,
        eps: float = 0.1,
        alpha: float = 0.5,
        freq: int = 1,
        trainable: bool = False,
        groups: int = 1,
        backend: str = "auto",
        sweeps: int = 6,
        solver: str = "jacobi",
        filter: str = "power",
        filter_scale: float | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(dim=dim, rho=rho, eps=eps, alpha=alpha, freq=freq, groups=groups)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not (isinstance(sweeps, int) and sweeps >= 0):
            raise ValueError(f"sweeps must be an integer >= 0, got {sweeps!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if solver == "orth" and dim // groups > ORTH_MAX_BLOCK:
            raise ValueError(f"solver='orth' needs dim / groups <= {ORTH_MAX_BLOCK} (a block in registers), got "
                             f"{dim // groups}; use solver='jacobi' or more groups")
        _check_filter(filter, filter_scale, alpha)
        self.filter = filter
        self.filter_scale = None if filter_scale is None else float(filter_scale)
        self.dim, self.rho, self.eps, self.alpha = dim, float(rho), float(eps), float(alpha)
        self.freq, self.groups, self.trainable = freq, groups, trainable
        self.backend, self.sweeps, self.solver = backend, sweeps, solver
        self.process_group = process_group
        block = dim // groups
        identity = torch.eye(block).expand(groups, block, block).clone()  # (G, m, m)
        self.register_buffer("F", torch.zeros(groups, block, block))
        self.register_buffer("U", identity.clone())
        if trainable:
            self.W = nn.Parameter(identity)
        else:
            self.register_buffer("W", identity)
        self.register_buffer("num_folds", torch.zeros((), dtype=torch.int64))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("unconverged_solves", torch.zeros((), dtype=torch.int64))
        # The first solve starts cold (from the identity), so it gets the full sweep budget too.
        self.register_buffer("full_solve_next", torch.ones(groups, dtype=torch.bool))
        self._skip_alert = CounterAlert(
            "DirectPredictor skipped {count} batch(es) with non-finite values: F and W are unchanged. "
            "Later skips are counted in .skipped_updates without a warning."
        )
        self._solver_alert = CounterAlert(
            "DirectPredictor's eigensolver did not converge within its sweep cap ({count} time(s) so far); "
            "W was set from the best basis reached and the next refresh re-solves with more sweeps. "
            "Counted in .unconverged_solves."
        )

    def _apply(self, fn, recurse=True):
        # The statistics stay fp32 whatever the model is cast to (`.half()`, `.to(torch.bfloat16)`): the
        # contract's accuracy depends on it. Device moves apply as usual; a cast keeps the exact fp32 values.
        fp32_state = {name: self._buffers[name] for name in ("F", "U", "W") if name in self._buffers}
        super()._apply(fn, recurse)
        for name, before in fp32_state.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def extra_repr(self) -> str:
        parts = [f"{self.dim}", f"rho={self.rho}", f"eps={self.eps}", f"alpha={self.alpha}", f"freq={self.freq}"]
        if self.filter != "power":
            parts.append(f"filter={self.filter!r}, filter_scale={self.filter_scale}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.trainable:
            parts.append("trainable=True")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        if self.solver != "jacobi":
            parts.append(f"solver={self.solver!r}")
        return ", ".join(parts)

    @property
    def matrix(self) -> torch.Tensor:
        """W as one (d, d) matrix (block-diagonal when ``groups > 1``)."""
        return self.W[0] if self.groups == 1 else torch.block_diag(*self.W.unbind(0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        # The refresh below rewrites W in place; autograd must keep the W this output was computed with.
        W = self.W.clone() if self.training else self.W
        # The caller's autocast region (bf16 on CUDA by default in mixed-precision loops) must not reach the
        # statistics: it would run z^T z, the solver's matmuls and U diag(p) U^T in bf16 (errors ~1e-3, and the
        # kernels' fp32 checks fail). Inside, matmuls follow the tensors' dtypes: W is applied in z's dtype.
        with torch.autocast(z.device.type, enabled=False):
            out = self._apply_predictor(z, W)
            if self.training:
                with torch.no_grad():
                    self._fold_and_refresh(z.detach())
        return out

    def _apply_predictor(self, z: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        W = W.to(z.dtype)
        if self.groups == 1:
            return z @ W[0]
        return (torch_backend.feature_blocks(z, self.groups) @ W).transpose(0, 1).reshape(z.shape[0], self.dim)

    def _fold_and_refresh(self, z: torch.Tensor) -> None:
        backend = self._backend_for(z.device)
        if backend is torch_backend:
            if not self._step_on_host(z):
                self._skip_alert.poll(self.skipped_updates)
        else:
            self._step_on_device(z, backend)
            self._skip_alert.poll(self.skipped_updates)
            self._solver_alert.poll(self.unconverged_solves)

    def _step_on_host(self, z: torch.Tensor) -> bool:
        """The torch backend: flags read on the host (free on the CPU; on CUDA eigh waits anyway).

        Returns whether the batch was folded."""
        folds = int(self.num_folds)
        if self._world_size() > 1:
            C, valid_on_device = self._global_correlation(z, torch_backend)
            torch_backend.fold_ema_(self.F, C, self.rho, self.num_folds == 0, valid_on_device)
            valid = bool(valid_on_device)
        else:
            valid = torch_backend.fold_(self.F, z, self.rho, first=folds == 0)
        if not valid:
            self.skipped_updates += 1
            return False
        self.num_folds += 1
        if (folds + 1) % self.freq == 0:
            torch_backend.refresh_predictor_(self.F, self.U, self.W, alpha=self.alpha, eps=self.eps, floor=P_FLOOR,
                                             filter=self.filter, scale=self.filter_scale)
        return True

    def _step_on_device(self, z: torch.Tensor, backend: ModuleType) -> None:
        """The triton backend: every decision is a device tensor, so the step never waits on the host."""
        first = self.num_folds == 0
        if self._world_size() > 1:
            C, valid = self._global_correlation(z, backend)
            torch_backend.fold_ema_(self.F, C, self.rho, first, valid)
        else:
            valid = backend.fold_(self.F, z, self.rho, first)
        self.num_folds += valid
        self.skipped_updates += ~valid
        backend.refresh_predictor_(
            self.F, self.U, self.W, self.full_solve_next, self.unconverged_solves,
            enable=valid & (self.num_folds % self.freq == 0),
            alpha=self.alpha, eps=self.eps, floor=P_FLOOR, sweeps=self.sweeps, solver=self.solver,
            filter=self.filter, scale=self.filter_scale,
        )  # fmt: skip

    def _backend_for(self, device: torch.device) -> ModuleType:
        name = self.backend
        if name == "auto":
            name = "triton" if device.type == "cuda" else "torch"
        if name == "torch":
            return torch_backend
        from fastpred import triton_backend  # imports triton: only where it is used

        triton_backend.check_device(device)
        return triton_backend

    def _global_correlation(self, z: torch.Tensor, backend: ModuleType) -> tuple[torch.Tensor, torch.Tensor]:
        """C = z^T z / N over the global batch (G, m, m), and whether it is finite (0-dim bool); world size > 1.

        Non-finite rows on any rank make the all-reduced sum non-finite, so every rank skips alike.
        """
        gram = backend.grouped_gram(z, self.groups)
        count = torch.full((1,), float(z.shape[0]), device=gram.device)  # a fill, not a copy: graph-safe
        packed = torch.cat([gram.flatten(), count])  # one collective for both
        dist.all_reduce(packed, group=self.process_group)
        C = packed[:-1].view_as(gram) / packed[-1:]
        return C, torch_backend.diagonal_is_finite(C)

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _check_input(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"DirectPredictor expected input of shape (N, {self.dim}), got {got}")
        if z.shape[0] == 0:
            raise ValueError(f"DirectPredictor expected at least one row, got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"DirectPredictor expected a floating-point input, got {z.dtype}")
        if z.device != self.F.device:
            raise ValueError(f"DirectPredictor is on {self.F.device} but its input is on {z.device}")


def _check_filter(filter: str, filter_scale: float | None, alpha: float) -> None:
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {', '.join(FILTERS)}, got {filter!r}")
    if filter == "power":
        return
    if isinstance(filter_scale, bool) or not isinstance(filter_scale, (int, float)) or not 0 < filter_scale < math.inf:
        raise ValueError(f"filter={filter!r} needs filter_scale > 0 (N in sigma^2 = N s; the authors': the global "
                         f"batch size per view), got {filter_scale!r}")
    if alpha != 0.5:
        raise ValueError(f"alpha applies only to filter='power' (filter={filter!r} has no exponent), got {alpha!r}")


def _check_arguments(*, dim: int, rho: float, eps: float, alpha: float, freq: int, groups: int) -> None:
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got {rho!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not alpha > 0.0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not (isinstance(freq, int) and freq >= 1):
        raise ValueError(f"freq must be an integer >= 1, got {freq!r}")
    if not (isinstance(groups, int) and groups >= 1 and dim % groups == 0):
        raise ValueError(f"groups must be an integer >= 1 dividing dim={dim}, got {groups!r}")
