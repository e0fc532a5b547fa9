"""The full-matrix gradient flow (2)-(4) of a two-layer linear BYOL, for small n (Tian, Chen, Ganguli 2021).

Symbols: W (n, d) the online layer, W_p (n, n) the predictor, W_a (n, d) the target, X (d, d) the
augmentation-averaged data correlation, X' (d, d) the augmentation covariance, F = W W^T (n, n).

    dW_p/dt = alpha_p (-W_p W (X + X') + W_a X) W^T - eta W_p          (2)
    dW/dt   = W_p^T (-W_p W (X + X') + W_a X) - eta W                    (3)
    dW_a/dt = beta (W - W_a)                                             (4)

``beta=None`` replaces (4) by W_a = tau W (tau fixed; tau = 1 is SimSiam), the setting of Theorem 3:
with X = I and X' = sigma2 I, d/dt [F, W_p] = -[F, W_p] K - K [F, W_p] for a symmetric W_p, with
K = (1 + sigma2)(alpha_p/2 F + W_p^2 - tau/(1 + sigma2) W_p) + 3/2 eta I.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fastpred.dynamics.eigenmode import integrate


@dataclass(frozen=True)
class MatrixFlowConfig:
    """One run of the matrix flow; every field is a CLI flag of ``python -m fastpred.dynamics matrix``."""

    n: int = 6  # output dim: F and W_p are n x n
    d: int = 6  # input dim: X and X' are d x d
    alpha_p: float = 1.0  # predictor lr ratio
    sigma2: float = 0.5  # X' = sigma2 I (aug="iso"), or the mean eigenvalue of a random PSD X' (aug="random")
    aug: str = "iso"  # "iso" or "random" (X' a random PSD matrix; Theorem 3's K is then only indicative)
    eta: float = 0.01  # weight decay
    tau: float = 1.0  # W_a = tau W when beta is None
    beta: float | None = None  # EMA rate of Eq. (4); None: W_a = tau W
    symmetrize: bool = False  # project dW_p/dt onto symmetric matrices (Theorem 3's symmetric W_p)
    w_scale: float = 1.0  # W(0) ~ w_scale * N(0, 1/d)
    wp_scale: float = 0.3  # W_p(0) ~ wp_scale * N(0, 1/n), asymmetric unless symmetrize
    dt: float = 0.02
    steps: int = 2000
    every: int = 10  # record every this many steps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.d < 1:
            raise ValueError(f"n and d must be >= 1, got n={self.n}, d={self.d}")
        if self.aug not in ("iso", "random"):
            raise ValueError(f"aug must be 'iso' or 'random', got {self.aug!r}")


@dataclass
class MatrixTrajectory:
    """What the figure and the tests read, sampled at times t (T,)."""

    t: np.ndarray
    commutator: np.ndarray  # ||[F, W_p]||_F, (T,)
    asymmetry: np.ndarray  # ||W_p - W_p^T||_F / ||W_p||_F, (T,)
    k_min: np.ndarray  # smallest eigenvalue of K (built from the symmetric part of W_p), (T,)
    eig_F: np.ndarray  # eigenvalues of F, ascending, (T, n)
    eig_Wp: np.ndarray  # eigenvalues of the symmetric part of W_p, ascending, (T, n)
    alignment: np.ndarray  # cos(u_j, W_p u_j) for F's eigenvectors u_j, ascending s_j, (T, n)
    final: dict = field(default_factory=dict)  # W, W_p, W_a at the end


def augmentation_covariance(cfg: MatrixFlowConfig, rng: np.random.Generator) -> np.ndarray:
    """X' (d, d): sigma2 I, or a random PSD matrix with the same trace."""
    if cfg.aug == "iso":
        return cfg.sigma2 * np.eye(cfg.d)
    g = rng.standard_normal((cfg.d, cfg.d))
    xp = g @ g.T
    return xp * (cfg.sigma2 * cfg.d / np.trace(xp))


def theorem3_K(F: np.ndarray, Wp: np.ndarray, cfg: MatrixFlowConfig) -> np.ndarray:
    """K of Theorem 3 from the symmetric part of W_p (K is symmetric only for a symmetric W_p)."""
    S = 0.5 * (Wp + Wp.T)
    c = 1.0 + cfg.sigma2
    return c * (0.5 * cfg.alpha_p * F + S @ S - cfg.tau / c * S) + 1.5 * cfg.eta * np.eye(len(F))


def make_rhs(cfg: MatrixFlowConfig, X: np.ndarray, Xp: np.ndarray):
    """dy/dt for y = (W, W_p, W_a) under (2)-(4), or (2)-(3) with W_a = tau W."""
    XX = X + Xp

    def rhs(W: np.ndarray, Wp: np.ndarray, Wa: np.ndarray):
        Wa_eff = cfg.tau * W if cfg.beta is None else Wa
        R = -Wp @ W @ XX + Wa_eff @ X  # the residual term shared by (2) and (3), (n, d)
        dWp = cfg.alpha_p * R @ W.T - cfg.eta * Wp
        if cfg.symmetrize:
            dWp = 0.5 * (dWp + dWp.T)
        dW = Wp.T @ R - cfg.eta * W
        dWa = np.zeros_like(Wa) if cfg.beta is None else cfg.beta * (W - Wa)
        return dW, dWp, dWa

    return rhs


def initial_state(cfg: MatrixFlowConfig) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """((W, W_p, W_a) at t = 0, X'), seeded."""
    rng = np.random.default_rng(cfg.seed)
    W = cfg.w_scale * rng.standard_normal((cfg.n, cfg.d)) / np.sqrt(cfg.d)
    Wp = cfg.wp_scale * rng.standard_normal((cfg.n, cfg.n)) / np.sqrt(cfg.n)
    if cfg.symmetrize:
        Wp = 0.5 * (Wp + Wp.T)
    Xp = augmentation_covariance(cfg, rng)
    return (W, Wp, W.copy()), Xp


def simulate_matrix_flow(cfg: MatrixFlowConfig, *, method: str = "rk4") -> MatrixTrajectory:
    """Integrate (2)-(4) with X = I and record the alignment diagnostics every ``cfg.every`` steps."""
    y0, Xp = initial_state(cfg)
    X = np.eye(cfg.d)
    t, (Ws, Wps, Was) = integrate(make_rhs(cfg, X, Xp), y0, cfg.dt, cfg.steps, method=method, every=cfg.every)
    F = Ws @ np.swapaxes(Ws, 1, 2)  # (T, n, n)
    C = F @ Wps - Wps @ F
    S = 0.5 * (Wps + np.swapaxes(Wps, 1, 2))
    eig_F, U = np.linalg.eigh(F)
    WpU = Wps @ U  # column j is W_p u_j
    # cos(u_j, W_p u_j); |u_j| = 1. A tiny floor keeps a collapsed W_p from dividing by zero.
    align = np.einsum("tij,tij->tj", U, WpU) / np.maximum(np.linalg.norm(WpU, axis=1), 1e-300)
    wp_norm = np.linalg.norm(Wps, axis=(1, 2))
    return MatrixTrajectory(
        t=t,
        commutator=np.linalg.norm(C, axis=(1, 2)),
        asymmetry=np.linalg.norm(Wps - np.swapaxes(Wps, 1, 2), axis=(1, 2)) / np.maximum(wp_norm, 1e-300),
        k_min=np.array([np.linalg.eigvalsh(theorem3_K(f, wp, cfg))[0] for f, wp in zip(F, Wps, strict=True)]),
        eig_F=eig_F,
        eig_Wp=np.linalg.eigvalsh(S),
        alignment=align,
        final={"W": Ws[-1], "Wp": Wps[-1], "Wa": Was[-1]},
    )
