"""Figures of `python -m fastpred.dynamics`; matplotlib is imported here only, lazily, with the Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fastpred.dynamics.eigenmode import (
    ModeParams,
    collapse_threshold,
    mode_jacobian,
    mode_rhs,
    nonzero_fixed_points,
    parabola_rate,
    parabola_rate_slope,
    simulate_modes,
)
from fastpred.dynamics.race import LEARNED

STABLE, UNSTABLE = "tab:red", "tab:green"  # the paper's colours: stable red, unstable green
DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # figures are files; never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    return path


def _eta_label(eta: float, tau: float, sigma2: float) -> str:
    eta_c = collapse_threshold(tau, sigma2)
    regime = "no weight decay" if eta == 0 else ("two non-zero fixed points" if eta <= eta_c else "collapse only")
    return f"eta = {eta:g} ({regime})"


def plane_fixed_points(tau: float, prm: ModeParams) -> list[tuple[float, float, bool]]:
    """Fixed points (p, s, stable) of (11)-(12) on the invariant parabola, stability from the 2-D Jacobian.

    At eta = 0 the origin is degenerate (the whole axis s = 0 is fixed) and is drawn as unstable, as
    THEORY.md calls it a saddle; p = tau / (1 + sigma2) is then a whole line of fixed points, drawn dotted.
    """
    pts = [0.0]
    roots = nonzero_fixed_points(tau, prm.eta, prm.sigma2)
    if roots is not None:
        pts += [r for r in roots if r > 0 and not np.isclose(r, 0.0)]
    out = []
    for p in pts:
        s = p * p / prm.alpha_p
        if p == 0.0:
            stable = prm.eta > 0  # Jacobian eigenvalues -eta, -2 eta
        else:
            # <= 0 rather than < 0: at eta = 0 the point sits on a line of fixed points (one zero
            # eigenvalue along it) that attracts nearby trajectories, so it counts as stable.
            stable = bool(np.all(np.linalg.eigvals(mode_jacobian(p, s, tau, prm)).real <= 1e-12))
        out.append((p, s, stable))
    return out


def phase_portraits(
    path: Path,
    etas: Sequence[float] = (0.0, 0.01, 1.0),
    *,
    tau: float = 1.0,
    alpha_p: float = 1.0,
    sigma2: float = 0.0,
    p_range: tuple[float, float] = (-0.4, 1.4),
    s_range: tuple[float, float] = (0.0, 1.6),
    grid: int = 60,
) -> Path:
    """Fig. 3: streamlines of (11)-(12) in the (p, s) plane at fixed tau, one panel per eta."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(etas), figsize=(4.2 * len(etas), 4.0), squeeze=False)
    P, S = np.meshgrid(np.linspace(*p_range, grid), np.linspace(*s_range, grid))
    pp = np.linspace(*p_range, 400)
    for ax, eta in zip(axes[0], etas, strict=True):
        prm = ModeParams(alpha_p=alpha_p, sigma2=sigma2, eta=eta)
        dP, dS, _ = mode_rhs(P, S, tau, prm)
        speed = np.hypot(dP, dS)
        # log speed for colour: the flow spans orders of magnitude near the fixed points
        ax.streamplot(P, S, dP, dS, color=np.log10(speed + 1e-12), cmap="Greys", density=1.1, linewidth=0.8,
                      arrowsize=0.9)
        ax.plot(pp, pp**2 / alpha_p, "k--", lw=1.2, label="s = p^2 / alpha_p")
        if eta == 0:
            ax.axvline(tau / (1 + sigma2), color=STABLE, ls=":", lw=1.2, label="fixed line p = tau/(1+sigma^2)")
        for p, s, stable in plane_fixed_points(tau, prm):
            ax.plot(p, s, "o", ms=9, color=STABLE if stable else UNSTABLE, mec="k", zorder=5)
        ax.plot([], [], "o", color=STABLE, mec="k", label="stable")
        ax.plot([], [], "o", color=UNSTABLE, mec="k", label="unstable")
        ax.set(xlim=p_range, ylim=s_range, xlabel="p (eigenvalue of W_p)", ylabel="s (eigenvalue of F = W W^T)",
               title=_eta_label(eta, tau, sigma2))
        ax.legend(loc="upper left", fontsize=7, framealpha=0.9)
    fig.suptitle(f"Eigenmode flow (11)-(12): tau = {tau:g}, alpha_p = {alpha_p:g}, sigma^2 = {sigma2:g}", y=1.02)
    return _save(fig, path)


def regimes(
    path: Path,
    etas: Sequence[float] | None = None,
    *,
    tau: float = 1.0,
    sigma2: float = 0.0,
    p_range: tuple[float, float] | None = None,
) -> Path:
    """Fig. 4: dp/dt = p^2 [tau - (1 + sigma2) p] - eta p on the parabola, one panel per regime.

    Default etas: 0, 0.6 and 1.6 times the collapse threshold tau^2 / (4 (1 + sigma2)), so that the
    middle regime's two non-zero fixed points are visibly apart whatever sigma2 is.
    """
    plt = _plt()
    eta_c = collapse_threshold(tau, sigma2)
    etas = (0.0, 0.6 * eta_c, 1.6 * eta_c) if etas is None else tuple(etas)
    p_hi = 1.25 * tau / (1 + sigma2)
    p_range = (-0.15 * p_hi, p_hi) if p_range is None else p_range
    pp = np.linspace(*p_range, 500)
    fig, axes = plt.subplots(1, len(etas), figsize=(4.2 * len(etas), 3.4), squeeze=False)
    for ax, eta in zip(axes[0], etas, strict=True):
        f = parabola_rate(pp, tau, eta, sigma2)
        ax.plot(pp, f, "k", lw=1.5)
        ax.axhline(0, color="0.5", lw=0.8)
        roots = nonzero_fixed_points(tau, eta, sigma2)
        fixed = [0.0] + ([] if roots is None else [r for r in roots if r > 0])
        for p in sorted(set(fixed)):
            slope = parabola_rate_slope(p, tau, eta, sigma2)
            stable = slope < 0 if p != 0 or eta > 0 else False  # eta = 0: p = 0 is a double root
            ax.plot(p, 0, "o", ms=9, color=STABLE if stable else UNSTABLE, mec="k", zorder=5)
        # arrows on the axis: the direction p moves in, between the fixed points
        bounds = [p_range[0], *sorted(set(fixed)), p_range[1]]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            m = 0.5 * (a + b)
            if b - a < 0.04 * (p_range[1] - p_range[0]):
                continue
            direction = np.sign(parabola_rate(m, tau, eta, sigma2))
            if direction != 0:
                ax.annotate("", xy=(m + 0.04 * direction * (p_range[1] - p_range[0]), 0), xytext=(m, 0),
                            arrowprops={"arrowstyle": "->", "color": "tab:blue", "lw": 1.8})
        ax.set(xlim=p_range, xlabel="p (on the parabola s = p^2 / alpha_p)", ylabel="dp/dt",
               title=f"eta = {eta:.3g} ({eta / eta_c:.2g} x threshold)" if eta_c > 0 else f"eta = {eta:.3g}")
    fig.suptitle(f"1-D dynamics on the invariant parabola: tau = {tau:g}, sigma^2 = {sigma2:g}, "
                 f"threshold eta_c = {eta_c:.3g}; red stable, green unstable", y=1.03)
    fig.tight_layout()
    return _save(fig, path)


def sweeps(
    path: Path,
    *,
    lr: float = 0.01,
    beta: float = 0.4,
    eta: float = 0.04,
    etas: Sequence[float] = (0.01, 0.04, 0.1, 0.2, 0.3),
    betas: Sequence[float] = (0.04, 0.1, 0.4, 1.0),
    alpha_p: float = 1.0,
    sigma2: float = 0.0,
    p0: float = 0.2,
    s0: float = 0.5,
    tau0: float = 1.0,
    steps: int = 5000,
) -> Path:
    """Fig. 5: Euler simulation of (11)-(13) with step ``lr``: a weight-decay sweep and an EMA-rate sweep."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    rows = [("eta", etas, lambda v: ModeParams(alpha_p, sigma2, v, beta), f"beta = {beta:g}"),
            ("beta", betas, lambda v: ModeParams(alpha_p, sigma2, eta, v), f"eta = {eta:g}")]
    every = max(1, steps // 500)
    for row, (name, values, make, fixed) in zip(axes, rows, strict=True):
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
        for v, color in zip(values, colors, strict=True):
            tr = simulate_modes(p0, s0, make(v), tau0=tau0, dt=lr, steps=steps, method="euler", every=every)
            it = tr.t / lr
            for ax, y in zip(row, (tr.p, tr.s, tr.tau), strict=True):
                ax.plot(it, y, color=color, label=f"{name} = {v:g}")
        for ax, ylabel in zip(row, ("p", "s", "tau"), strict=True):
            ax.set(xlabel="iteration", ylabel=ylabel, title=f"{ylabel}: sweeping {name} ({fixed})")
        row[0].legend(fontsize=8)
    fig.suptitle(f"Euler simulation of (11)-(13): lr = {lr:g}, alpha_p = {alpha_p:g}, sigma^2 = {sigma2:g}, "
                 f"start p = {p0:g}, s = {s0:g}, tau = {tau0:g}", y=1.01)
    fig.tight_layout()
    return _save(fig, path)


def matrix_flow(path: Path, traj, cfg) -> Path:
    """The full-matrix flow (2)-(4): commutator, asymmetry, K's smallest eigenvalue, spectra, alignment."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    t = traj.t
    ax = axes[0, 0]
    ax.semilogy(t, np.maximum(traj.commutator, 1e-300), "k")
    ax.set(xlabel="t", ylabel="||[F, W_p]||_F", title="commutator of F = W W^T and W_p")
    ax = axes[0, 1]
    ax.semilogy(t, np.maximum(traj.asymmetry, 1e-300), "k")
    ax.set(xlabel="t", ylabel="||W_p - W_p^T|| / ||W_p||", title="asymmetry of W_p")
    if cfg.symmetrize:
        ax.text(0.5, 0.5, "symmetric by construction\n(--symmetrize)", ha="center", transform=ax.transAxes)
    ax = axes[0, 2]
    ax.plot(t, traj.k_min, "k")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.fill_between(t, traj.k_min, 0, where=traj.k_min > 0, color=STABLE, alpha=0.15, label="K positive definite")
    title = "min eigenvalue of Theorem 3's K" + ("" if cfg.beta is None and cfg.aug == "iso" else " (indicative)")
    ax.set(xlabel="t", ylabel="lambda_min(K)", title=title)
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(t, traj.eig_F)
    ax.set(xlabel="t", ylabel="s_j", title="eigenvalues of F")
    ax = axes[1, 1]
    ax.plot(t, traj.eig_Wp)
    p_star = nonzero_fixed_points(cfg.tau, cfg.eta, cfg.sigma2)
    if p_star is not None and cfg.beta is None:
        ax.axhline(p_star[1], color=STABLE, ls="--", lw=1, label="p*_+ of the eigenmode flow")
        ax.legend(fontsize=8)
    ax.set(xlabel="t", ylabel="p_j", title="eigenvalues of (W_p + W_p^T) / 2")
    ax = axes[1, 2]
    ax.plot(t, traj.alignment)
    ax.set(xlabel="t", ylabel="cos(u_j, W_p u_j)", title="alignment with F's eigenvectors u_j", ylim=(-1.05, 1.05))
    target = f"W_a = {cfg.tau:g} W" if cfg.beta is None else f"EMA target, beta = {cfg.beta:g}"
    fig.suptitle(f"Full-matrix flow (2)-(4): n = {cfg.n}, d = {cfg.d}, X = I, X' = {cfg.aug} "
                 f"(sigma^2 = {cfg.sigma2:g}), alpha_p = {cfg.alpha_p:g}, eta = {cfg.eta:g}, {target}", y=1.01)
    fig.tight_layout()
    return _save(fig, path)


def feature_race(path: Path, results: Sequence) -> Path:
    """One column per head. Top: each neuron's |cos| with v1 and v2 over training in one run; middle: that
    run's head entries; bottom: where every neuron of every run ended, with the counts."""
    plt = _plt()
    by_head = {r.head: r for r in results}
    run = _run_to_show(by_head)
    fig, axes = plt.subplots(3, len(results), figsize=(4.6 * len(results), 10.5), squeeze=False)
    titles = {"none": "no head", "offdiag": "identity head, trainable off-diagonals", "direct": "DirectPred head"}
    for col, r in enumerate(results):
        m = r.alignment.shape[2]
        colors = plt.cm.tab10(np.arange(m) % 10)
        ax = axes[0, col]
        for i in range(m):
            ax.plot(r.steps, r.alignment[run, :, i, 0], color=colors[i], lw=1.8, label=f"neuron {i + 1}: v1")
            ax.plot(r.steps, r.alignment[run, :, i, 1], color=colors[i], lw=1.8, ls="--", label=f"neuron {i + 1}: v2")
        ax.set(ylim=(-0.02, 1.02), xlabel="step", ylabel="|cos(w_i, v_j)|",
               title=f"{titles.get(r.head, r.head)}\nrun {run + 1} of {r.alignment.shape[0]}: solid v1 (strong), "
                     "dashed v2 (weak)")
        ax.legend(fontsize=6, loc="center right", ncol=2)
        ax = axes[1, col]
        if r.head_matrix is None:
            ax.text(0.5, 0.5, "no head", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        else:
            for j in range(m):  # column j of W feeds neuron j's prediction (z @ W): colour it as neuron j
                for i in range(m):
                    if i != j:
                        ax.plot(r.steps, r.head_matrix[run, :, i, j], color=colors[j], lw=1.0,
                                label=f"W[., {j + 1}] (into neuron {j + 1})" if i == (j + 1) % m else None)
            diag = r.head_matrix[run][:, np.arange(m), np.arange(m)].mean(1)
            ax.plot(r.steps, diag, "k:", lw=1.2, label="mean diagonal")
            ax.set(xlabel="step", ylabel="head entry",
                   title=f"run {run + 1}: head W (applied as z @ W), diagonal dotted;\n"
                         "off-diagonals coloured by the neuron they feed")
            ax.legend(fontsize=6, ncol=2)
        ax = axes[2, col]
        end = r.alignment[:, -1].reshape(-1, 2)
        counts = r.outcome()
        ax.scatter(end[:, 0], end[:, 1], s=18, alpha=0.6, color="tab:blue")
        ax.axvline(LEARNED, color="0.6", lw=0.8, ls=":")
        ax.axhline(LEARNED, color="0.6", lw=0.8, ls=":")
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="final |cos(w_i, v1)|", ylabel="final |cos(w_i, v2)|",
               title=f"all {counts['runs']} runs, {counts['neurons']} neurons: {counts['on_v1']} on v1, "
                     f"{counts['on_v2']} on v2, {counts['neither']} neither\n"
                     f"runs with a neuron on v2: {counts['runs_with_v2']} of {counts['runs']}")
    fig.suptitle("Feature race (cubic neurons, BatchNorm, stop-gradient): which neuron learns which feature", y=1.0)
    fig.tight_layout()
    return _save(fig, path)


def _run_to_show(by_head: dict) -> int:
    """The first run in which the off-diagonal head put a neuron on v2 (its sequence is the point), else run 0."""
    r = by_head.get("offdiag")
    if r is None:
        return 0
    with_v2 = np.flatnonzero(r.learned(1).any(1))
    return int(with_v2[0]) if with_v2.size else 0
