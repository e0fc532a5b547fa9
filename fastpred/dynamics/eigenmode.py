"""The decoupled eigenmode dynamics of a two-layer linear BYOL (Tian, Chen, Ganguli 2021, Eqs. 11-14).

Symbols, defined once (THEORY.md):
    p      eigenvalue of the predictor W_p on one shared eigenvector
    s      eigenvalue of F = W W^T on the same eigenvector
    tau    target scale, W_a = tau W
    alpha_p  predictor learning-rate ratio; eta weight decay; beta EMA rate; sigma2 augmentation variance

    dp/dt   = alpha_p s [tau - (1 + sigma2) p] - eta p                      (11)
    ds/dt   = 2 p s [tau - (1 + sigma2) p] - 2 eta s                        (12)
    dtau/dt = beta (1 - tau) - tau (ds/dt) / (2 s)                          (13)

Every function is vectorised: p, s, tau may be arrays of any common shape (one mode per entry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ArrayLike = float | np.ndarray


@dataclass(frozen=True)
class ModeParams:
    """Parameters of Eqs. (11)-(13); ``beta=None`` holds tau fixed (drops Eq. 13)."""

    alpha_p: float = 1.0  # predictor lr ratio
    sigma2: float = 0.0  # augmentation variance, X' = sigma2 I (not stated for Fig. 3 in the paper)
    eta: float = 0.0  # weight decay
    beta: float | None = None  # EMA rate of the target; None: tau is a constant

    def __post_init__(self) -> None:
        if not self.alpha_p > 0:
            raise ValueError(f"alpha_p must be > 0, got {self.alpha_p!r}")
        if not self.sigma2 >= 0:
            raise ValueError(f"sigma2 must be >= 0, got {self.sigma2!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")
        if self.beta is not None and not self.beta >= 0:
            raise ValueError(f"beta must be >= 0 or None, got {self.beta!r}")


def mode_rhs(p: ArrayLike, s: ArrayLike, tau: ArrayLike, prm: ModeParams) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """(dp/dt, ds/dt, dtau/dt) of Eqs. (11)-(13)."""
    g = tau - (1.0 + prm.sigma2) * p
    dp = prm.alpha_p * s * g - prm.eta * p
    # (ds/dt) / (2 s) written out, so Eq. (13) stays finite when a mode collapses (s -> 0).
    half_log_rate = p * g - prm.eta
    ds = 2.0 * s * half_log_rate
    dtau = 0.0 * tau if prm.beta is None else prm.beta * (1.0 - tau) - tau * half_log_rate
    return dp, ds, dtau


@dataclass
class ModeTrajectory:
    """Samples of an integration: t (T,), and p, s, tau of shape (T, *mode_shape)."""

    t: np.ndarray
    p: np.ndarray
    s: np.ndarray
    tau: np.ndarray


def _step_euler(f: Callable, y: tuple, dt: float) -> tuple:
    return tuple(a + dt * b for a, b in zip(y, f(*y), strict=True))


def _step_rk4(f: Callable, y: tuple, dt: float) -> tuple:
    k1 = f(*y)
    k2 = f(*(a + 0.5 * dt * b for a, b in zip(y, k1, strict=True)))
    k3 = f(*(a + 0.5 * dt * b for a, b in zip(y, k2, strict=True)))
    k4 = f(*(a + dt * b for a, b in zip(y, k3, strict=True)))
    return tuple(
        a + dt / 6.0 * (b1 + 2.0 * b2 + 2.0 * b3 + b4) for a, b1, b2, b3, b4 in zip(y, k1, k2, k3, k4, strict=True)
    )


STEPPERS = {"euler": _step_euler, "rk4": _step_rk4}


def integrate(
    f: Callable, y0: tuple, dt: float, steps: int, *, method: str = "rk4", every: int = 1
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Fixed-step integration of dy/dt = f(*y) for a tuple of arrays y; returns t and stacked samples.

    Sampled at step 0 and every ``every`` steps (and the last step). Fixed steps on purpose: Fig. 5 is
    an Euler simulation whose step *is* the learning rate, and RK4 at a fixed step is accurate enough
    for the invariant test (its error is stated there).
    """
    if method not in STEPPERS:
        raise ValueError(f"method must be one of {sorted(STEPPERS)}, got {method!r}")
    if steps < 0 or every < 1 or not dt > 0:
        raise ValueError(f"need steps >= 0, every >= 1, dt > 0; got {steps}, {every}, {dt}")
    step = STEPPERS[method]
    y = tuple(np.asarray(a, dtype=np.float64) for a in y0)
    ts, ys = [0.0], [y]
    for i in range(1, steps + 1):
        y = step(f, y, dt)
        if i % every == 0 or i == steps:
            ts.append(i * dt)
            ys.append(y)
    return np.asarray(ts), [np.stack([yy[k] for yy in ys]) for k in range(len(y0))]


def simulate_modes(
    p0: ArrayLike,
    s0: ArrayLike,
    prm: ModeParams,
    *,
    tau0: ArrayLike = 1.0,
    dt: float = 0.01,
    steps: int = 1000,
    method: str = "rk4",
    every: int = 1,
) -> ModeTrajectory:
    """Integrate Eqs. (11)-(13) for modes starting at (p0, s0, tau0) (broadcast together)."""
    p0, s0, tau0 = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (p0, s0, tau0)))
    t, (p, s, tau) = integrate(lambda p, s, tau: mode_rhs(p, s, tau, prm), (p0, s0, tau0), dt, steps,
                               method=method, every=every)
    return ModeTrajectory(t, p, s, tau)


def invariant_offset(p: ArrayLike, s: ArrayLike, alpha_p: float) -> ArrayLike:
    """s - p^2 / alpha_p: equals c exp(-2 eta t) along any trajectory (Eq. 14), whatever tau does."""
    return s - np.square(p) / alpha_p


def collapse_threshold(tau: float, sigma2: float) -> float:
    """The weight decay above which only p = 0 remains on the parabola: tau^2 / (4 (1 + sigma2))."""
    return tau**2 / (4.0 * (1.0 + sigma2))


def nonzero_fixed_points(tau: float, eta: float, sigma2: float) -> tuple[float, float] | None:
    """Closed-form (p*_-, p*_+) on the parabola, or None beyond the collapse threshold."""
    disc = tau**2 - 4.0 * eta * (1.0 + sigma2)
    if disc < 0:
        return None
    root = np.sqrt(disc)
    return (tau - root) / (2.0 * (1.0 + sigma2)), (tau + root) / (2.0 * (1.0 + sigma2))


def parabola_rate(p: ArrayLike, tau: float, eta: float, sigma2: float) -> ArrayLike:
    """dp/dt on the invariant parabola s = p^2 / alpha_p at fixed tau: p^2 [tau - (1 + sigma2) p] - eta p."""
    return np.square(p) * (tau - (1.0 + sigma2) * p) - eta * p


def parabola_rate_slope(p: ArrayLike, tau: float, eta: float, sigma2: float) -> ArrayLike:
    """d(dp/dt)/dp on the parabola: negative at a stable fixed point, positive at an unstable one."""
    return 2.0 * tau * p - 3.0 * (1.0 + sigma2) * np.square(p) - eta


def find_parabola_fixed_points(
    tau: float, eta: float, sigma2: float, lo: float = -2.0, hi: float = 4.0, grid: int = 6001
) -> np.ndarray:
    """Roots of dp/dt on the parabola in [lo, hi], found numerically (sign changes, then bisection).

    Independent of the closed form on purpose: it is the test's check of it. A double root (p = 0 at
    eta = 0) shows no sign change, so it is caught by an exact zero on the grid instead.
    """
    ps = np.linspace(lo, hi, grid)
    fs = parabola_rate(ps, tau, eta, sigma2)
    roots = list(ps[fs == 0.0])
    for i in np.nonzero(np.sign(fs[:-1]) * np.sign(fs[1:]) < 0)[0]:
        a, b = ps[i], ps[i + 1]
        fa = fs[i]
        for _ in range(80):  # bisection to float64 resolution
            m = 0.5 * (a + b)
            fm = parabola_rate(m, tau, eta, sigma2)
            if np.sign(fm) == np.sign(fa):
                a, fa = m, fm
            else:
                b = m
        roots.append(0.5 * (a + b))
    return np.sort(np.asarray(roots))


def mode_jacobian(p: float, s: float, tau: float, prm: ModeParams) -> np.ndarray:
    """2 x 2 Jacobian of (11)-(12) in (p, s) at fixed tau; its eigenvalues decide stability in the plane."""
    c = 1.0 + prm.sigma2
    g = tau - c * p
    return np.array(
        [
            [-prm.alpha_p * s * c - prm.eta, prm.alpha_p * g],
            [2.0 * s * g - 2.0 * p * s * c, 2.0 * p * g - 2.0 * prm.eta],
        ]
    )
