"""Every formulation the suites compare, as plain functions and small steppers.

"official" is the DirectPred code of facebookresearch/luckmatters (ssl/real-dataset), rewritten here from
its description: per-sample outer products by bmm, mean over the batch, EMA, then an eigendecomposition
and W = Q diag(p) Q^T with an explicit diagonal matrix. The original called `torch.eig`, which PyTorch has
removed; `torch.linalg.eigh` (fp32) stands in for it. "torch" is the plain formulation a careful user would
write (addmm with beta = rho, eigh, reconstruction). "fastpred-*" call fastpred itself.
"""

from __future__ import annotations

import torch

from bench.harness import kernel
from bench.oracle import FLOOR
from fastpred import DirectPredictor, torch_backend

# --- correlation update: F (d, d) fp32 <- rho F + (1 - rho) z^T z / N, in place ------------------------------


def official_fold(F: torch.Tensor, z: torch.Tensor, rho: float) -> None:
    outer = torch.bmm(z.unsqueeze(2), z.unsqueeze(1))  # (N, d, d): the 4 N d^2 bytes DESIGN.md warns about
    F.mul_(rho).add_(outer.mean(dim=0), alpha=1.0 - rho)


def addmm_fold(F: torch.Tensor, z: torch.Tensor, rho: float) -> None:
    F.addmm_(z.mT, z, beta=rho, alpha=(1.0 - rho) / z.shape[0])


def fastpred_torch_fold(F: torch.Tensor, z: torch.Tensor, rho: float) -> None:
    """DirectPredictor's torch backend fold: fused addmm EMA, finiteness check, F kept if the batch is bad."""
    torch_backend.fold_(F.unsqueeze(0), z, rho, first=False)


def fastpred_triton_fold(F: torch.Tensor, z: torch.Tensor, rho: float) -> None:
    kernel("corr_ema")(F, z, rho)


FOLDS = {
    "official": official_fold,
    "torch-addmm": addmm_fold,
    "fastpred-torch": fastpred_torch_fold,
    "fastpred-triton": fastpred_triton_fold,
}

# --- W from F: (B, n, n) fp32 -> (W (B, n, n), ok (B,) bool or None), alpha = 1/2 ------------------------------
# ok is the solver's own verdict (converged and W written) where it gives one; the timed call ignores it.


def p_from(s: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    q = s.clamp(min=0) / s.amax(dim=-1, keepdim=True)  # amax: warm-started solvers do not sort s
    return (q.pow(alpha) + eps).clamp(min=FLOOR)


def torch_eigh_W(F: torch.Tensor, U_prev: torch.Tensor, alpha: float, eps: float) -> tuple[torch.Tensor, None]:
    """One `torch.linalg.eigh` call on the whole stack (cuSOLVER syevjBatched on CUDA when n <= 32)."""
    s, U = torch.linalg.eigh(F)
    return (U * p_from(s, alpha, eps)[..., None, :]) @ U.mT, None


def torch_eigh_loop_W(F: torch.Tensor, U_prev: torch.Tensor, alpha: float, eps: float) -> tuple[torch.Tensor, None]:
    """One eigh per block, as grouped code written block by block would do."""
    return torch.stack([torch_eigh_W(block, None, alpha, eps)[0] for block in F]), None


def fastpred_torch_W(F: torch.Tensor, U_prev: torch.Tensor, alpha: float, eps: float):
    """DirectPredictor's torch backend refresh, guards included (writes into fresh U and W buffers)."""
    U, W = U_prev.clone(), torch.empty_like(F)
    ok = torch_backend.refresh_predictor_(F, U, W, alpha=alpha, eps=eps, floor=FLOOR)
    return W, ok


def fastpred_warm_W(F: torch.Tensor, U_prev: torch.Tensor, alpha: float, eps: float):
    s, U, converged = kernel("eigh_warm")(F, U_prev)
    W, ok = kernel("predictor_from_eigh")(s, U, alpha, eps, floor=FLOOR)
    return W, converged & ok


def fastpred_cold_W(F: torch.Tensor, U_prev: torch.Tensor, alpha: float, eps: float):
    return fastpred_warm_W(F, None, alpha, eps)


def fastpred_newton_schulz_W(F: torch.Tensor, U_prev: torch.Tensor, alpha: float, eps: float):
    """Matmul-only square root (alpha = 1/2 only), max s by power iteration, kernels' default iterations.

    Plain torch matmuls inside fastpred.kernels, so it is a real provider on the CPU too."""
    assert alpha == 0.5, "Newton-Schulz computes the alpha = 1/2 predictor only"
    return kernel("predictor_newton_schulz")(F, eps)


SOLVERS = {
    "torch-eigh": torch_eigh_W,
    "torch-eigh-loop": torch_eigh_loop_W,
    "fastpred-torch": fastpred_torch_W,
    "fastpred-triton-warm": fastpred_warm_W,
    "fastpred-triton-cold": fastpred_cold_W,
    "fastpred-newton-schulz": fastpred_newton_schulz_W,
}

# --- one predictor step: out = z @ W, fold z into F, recompute W ---------------------------------------------
# Every stepper returns z @ W like a predictor's forward, so fastpred can be timed through its public forward.


class OfficialStep:
    def __init__(self, d: int, *, rho: float, eps: float, alpha: float, device: torch.device) -> None:
        self.rho, self.eps, self.alpha = rho, eps, alpha
        self.F = torch.zeros(d, d, device=device)
        self.W = torch.eye(d, device=device)
        self.first = True

    def step(self, z: torch.Tensor) -> torch.Tensor:
        out = z @ self.W
        outer = torch.bmm(z.unsqueeze(2), z.unsqueeze(1))  # (N, d, d)
        C = outer.mean(dim=0)
        self.F = C if self.first else self.rho * self.F + (1.0 - self.rho) * C
        self.first = False
        s, Q = torch.linalg.eigh(self.F)  # the original: torch.eig (removed from PyTorch)
        self.W = Q @ torch.diag(p_from(s, self.alpha, self.eps)) @ Q.T
        return out

    def matrix(self) -> torch.Tensor:
        return self.W


class PlainTorchStep(OfficialStep):
    """addmm with beta = rho into F, eigh, W = (U * p) U^T."""

    def step(self, z: torch.Tensor) -> torch.Tensor:
        out = z @ self.W
        beta, scale = (0.0, 1.0) if self.first else (self.rho, 1.0 - self.rho)
        self.F.addmm_(z.mT, z, beta=beta, alpha=scale / z.shape[0])
        self.first = False
        s, U = torch.linalg.eigh(self.F)
        self.W = (U * p_from(s, self.alpha, self.eps)) @ U.mT
        return out


class FastpredStep:
    """`DirectPredictor` in training mode, constructed with its defaults (backend included) unless given one."""

    def __init__(self, d: int, *, rho: float, eps: float, alpha: float, device: torch.device, **kwargs) -> None:
        self.module = DirectPredictor(d, rho=rho, eps=eps, alpha=alpha, **kwargs).to(device).train()

    def step(self, z: torch.Tensor) -> torch.Tensor:
        return self.module(z)

    def matrix(self) -> torch.Tensor:
        return self.module.matrix

    def backend(self) -> str:
        """The backend asked for and, for "auto", the one it documents picking (triton on CUDA, torch on CPU)."""
        name = str(getattr(self.module, "backend", "torch"))
        if name == "auto":
            return f"auto -> {'triton' if self.module.F.device.type == 'cuda' else 'torch'}"
        return name
