"""The eigenmode dynamics (11)-(14), their fixed points and the full-matrix flow (2)-(4); CLI smoke test."""

import numpy as np
import pytest

from fastpred.dynamics.eigenmode import (
    ModeParams,
    collapse_threshold,
    find_parabola_fixed_points,
    invariant_offset,
    mode_jacobian,
    nonzero_fixed_points,
    parabola_rate_slope,
    simulate_modes,
)
from fastpred.dynamics.matrix import MatrixFlowConfig, initial_state, make_rhs, simulate_matrix_flow, theorem3_K

# a grid of starts in the (p, s) plane, some off the parabola on either side. With Eq. (13) some starts
# at large p send tau (and the mode) to infinity in finite time, so the invariant test uses the inner box.
P0, S0 = (a.ravel() for a in np.meshgrid(np.linspace(-0.5, 1.5, 9), np.linspace(0.05, 2.0, 7)))
P_IN, S_IN = (a.ravel() for a in np.meshgrid(np.linspace(-0.2, 1.2, 8), np.linspace(0.05, 1.5, 6)))


@pytest.mark.parametrize("beta", [None, 0.4])  # tau fixed, and tau evolving by Eq. (13)
@pytest.mark.parametrize("eta,sigma2,alpha_p", [(0.0, 0.0, 1.0), (0.04, 0.5, 1.0), (0.3, 0.2, 2.5)])
def test_invariant_decays_as_exp_minus_2_eta_t(eta, sigma2, alpha_p, beta):
    prm = ModeParams(alpha_p=alpha_p, sigma2=sigma2, eta=eta, beta=beta)
    dt, steps = 0.005, 2000  # RK4, t up to 10
    tr = simulate_modes(P_IN, S_IN, prm, dt=dt, steps=steps, method="rk4", every=50)
    assert np.isfinite(tr.p).all() and np.isfinite(tr.tau).all()
    c = invariant_offset(P_IN, S_IN, alpha_p)
    expected = c[None, :] * np.exp(-2 * eta * tr.t)[:, None]
    # RK4's global error at dt = 0.005 is ~1e-9 here; 1e-7 (absolute, on offsets of order 1) leaves room
    np.testing.assert_allclose(invariant_offset(tr.p, tr.s, alpha_p), expected, rtol=0, atol=1e-7)
    # the check can fail: Euler at the same step misses the invariant by far more than the tolerance
    euler = simulate_modes(P_IN, S_IN, prm, dt=dt, steps=steps, method="euler", every=50)
    assert np.abs(invariant_offset(euler.p, euler.s, alpha_p) - expected).max() > 1e-4


@pytest.mark.parametrize("tau,eta,sigma2", [(1.0, 0.01, 0.0), (1.0, 0.15, 0.0), (0.8, 0.05, 0.6), (1.2, 0.2, 0.3)])
def test_fixed_points_match_closed_form_and_stability(tau, eta, sigma2):
    # eta = 0.01 (Fig. 3's) is checked by root-finding and the Jacobian only: near p*_- = 0.0101 the flow is
    # as slow as eta, so integrating to 1e-6 there would take most of this file's time budget
    assert eta < collapse_threshold(tau, sigma2)
    p_minus, p_plus = nonzero_fixed_points(tau, eta, sigma2)
    np.testing.assert_allclose(find_parabola_fixed_points(tau, eta, sigma2), [0.0, p_minus, p_plus], atol=1e-12)
    assert parabola_rate_slope(p_plus, tau, eta, sigma2) < 0 < parabola_rate_slope(p_minus, tau, eta, sigma2)
    prm = ModeParams(alpha_p=1.0, sigma2=sigma2, eta=eta)
    assert np.linalg.eigvals(mode_jacobian(p_plus, p_plus**2, tau, prm)).real.max() < 0  # stable in the plane
    assert np.linalg.eigvals(mode_jacobian(p_minus, p_minus**2, tau, prm)).real.max() > 0  # a saddle
    if eta < 0.05:
        return
    # integrating the 2-D flow (11)-(12) from the parabola, just either side of p*_-, and around p*_+
    starts = np.array([p_minus * 0.9, p_minus * 1.1, 0.5 * p_plus, 1.5 * p_plus])
    tr = simulate_modes(starts, starts**2, prm, tau0=tau, dt=0.05, steps=int(400 / eta), method="rk4", every=10**9)
    np.testing.assert_allclose(tr.p[-1], [0.0, p_plus, p_plus, p_plus], atol=1e-6)
    np.testing.assert_allclose(tr.s[-1], [0.0, p_plus**2, p_plus**2, p_plus**2], atol=1e-6)


@pytest.mark.parametrize("factor", [1.05, 2.0, 10.0])
def test_every_start_collapses_above_threshold(factor):
    tau, sigma2 = 1.0, 0.3
    eta = factor * collapse_threshold(tau, sigma2)
    assert nonzero_fixed_points(tau, eta, sigma2) is None
    tr = simulate_modes(P0, S0, ModeParams(sigma2=sigma2, eta=eta), dt=0.05, steps=int(60 / eta / 0.05 * 0.5),
                        method="rk4", every=10**9)
    assert np.abs(tr.p[-1]).max() < 1e-6 and np.abs(tr.s[-1]).max() < 1e-6
    # just below the threshold a start near p*_+ survives (the test separates the regimes)
    below = simulate_modes(0.6, 0.36, ModeParams(sigma2=sigma2, eta=0.95 * collapse_threshold(tau, sigma2)),
                           dt=0.05, steps=4000, method="rk4", every=10**9)
    assert below.p[-1] > 0.1


def test_commutator_obeys_theorem3_and_decays_while_K_is_positive_definite():
    # Theorem 3's setting: X = I, X' = sigma2 I, W_a = tau W, symmetric W_p (the symmetrised flow)
    # d > n keeps F = W W^T well conditioned, hence K positive definite from the start
    cfg = MatrixFlowConfig(n=4, d=16, sigma2=0.5, eta=0.02, symmetrize=True, w_scale=1.5, wp_scale=0.1, dt=0.01,
                           steps=600, every=1, seed=1)
    (W, Wp, Wa), Xp = initial_state(cfg)
    rhs = make_rhs(cfg, np.eye(cfg.d), Xp)
    traj = simulate_matrix_flow(cfg)
    assert traj.k_min.min() > 0.05, "the test needs K positive definite along the whole trajectory"
    # the identity d||C||^2/dt = -4 tr(C^T K C) at t = 0, against the exact derivative of C = [F, W_p]
    dW, dWp, _ = rhs(W, Wp, Wa)
    F = W @ W.T
    dF = dW @ W.T + W @ dW.T
    C = F @ Wp - Wp @ F
    dC = dF @ Wp + F @ dWp - dWp @ F - Wp @ dF
    K = theorem3_K(F, Wp, cfg)
    np.testing.assert_allclose(2 * np.sum(C * dC), -4 * np.trace(C.T @ K @ C), rtol=1e-10)
    # along the trajectory: monotone decay at least at the rate 2 lambda_min(K)
    log_c = np.log(traj.commutator)
    assert np.all(np.diff(log_c) < 0)
    bound = -2 * np.cumsum(traj.k_min[:-1] * np.diff(traj.t))
    assert np.all(log_c[1:] - log_c[0] <= bound + 1e-6)
    assert traj.commutator[-1] < 1e-4 * traj.commutator[0]


def test_commutator_grows_when_K_is_negative_definite():
    # W_p near tau / (2 (1 + sigma2)) I and a small F make K negative definite: Theorem 3 then says grow
    cfg = MatrixFlowConfig(n=4, d=4, sigma2=0.0, eta=0.0, symmetrize=True, w_scale=0.05, wp_scale=0.0, dt=0.01,
                           steps=50, every=1, seed=2)
    (W, _, Wa), Xp = initial_state(cfg)
    rng = np.random.default_rng(0)
    G = rng.standard_normal((4, 4))
    Wp = 0.5 * np.eye(4) + 0.02 * (G + G.T)
    F = W @ W.T
    assert np.linalg.eigvalsh(theorem3_K(F, Wp, cfg)).max() < 0
    dW, dWp, _ = make_rhs(cfg, np.eye(4), Xp)(W, Wp, Wa)
    dF = dW @ W.T + W @ dW.T
    C = F @ Wp - Wp @ F
    assert np.sum(C * (dF @ Wp + F @ dWp - dWp @ F - Wp @ dF)) > 0


def test_plain_flow_makes_W_p_symmetric_and_aligned():
    # (2)-(4) without symmetrisation, an asymmetric W_p(0), EMA target: symmetry and alignment emerge
    cfg = MatrixFlowConfig(n=6, d=6, sigma2=0.5, eta=0.01, beta=0.4, steps=2000, every=20, seed=0)
    traj = simulate_matrix_flow(cfg)
    assert traj.asymmetry[0] > 0.5 and traj.asymmetry[-1] < 0.02
    assert traj.commutator[-1] < 0.02 * traj.commutator[0]
    assert traj.k_min[-1] > 0
    assert traj.alignment[-1].min() > 0.999


def test_cli_writes_every_figure(tmp_path, capsys):
    from fastpred.dynamics.__main__ import main

    written = []
    written += main(["phase", "--out", str(tmp_path), "--grid", "15"])
    written += main(["regimes", "--out", str(tmp_path), "--sigma2", "0.5"])
    written += main(["sweep", "--out", str(tmp_path), "--steps", "50"])
    written += main(["matrix", "--out", str(tmp_path), "--steps", "40", "--n", "3", "--d", "4", "--aug", "random"])
    written += main(["race", "--out", str(tmp_path), "--steps", "3", "--batch", "16"])
    names = {"phase_portrait.png", "regimes.png", "sweeps.png", "matrix_flow.png", "feature_race.png"}
    assert {p.name for p in written} == names
    for p in written:
        assert p.parent == tmp_path and p.stat().st_size > 5_000 and p.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert all(str(p) in printed for p in written)
    assert "race offdiag: 0 of 8 runs with a neuron on v2; of 40 neurons" in printed  # 3 steps: nothing learned yet
