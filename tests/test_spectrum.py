"""SpectrumRecorder: values against numpy, the collapse alarm, no work off record steps, save/load, resume."""

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpred import DirectPredictor, LinearPredictor, MLPPredictor, OffDiagonalPredictor
from fastpred.train.spectrum import SpectrumRecorder, load_spectrum


def _numpy_alignment(F: np.ndarray, M: np.ndarray) -> np.ndarray:
    """cos(u_j, M u_j) for F's eigenvectors, largest eigenvalue first (M acts on column vectors)."""
    s, U = np.linalg.eigh(F)
    U = U[:, ::-1]
    MU = M @ U
    return np.einsum("ij,ij->j", U, MU) / np.linalg.norm(MU, axis=0)


def _numpy_effective_rank(s: np.ndarray) -> float:
    p = np.clip(s, 0, None)
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _batch(n=64, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)  # correlated features


def test_linear_head_against_numpy():
    d = 8
    z = _batch(d=d)
    head = LinearPredictor(d)  # a random, non-symmetric W
    rec = SpectrumRecorder(d, every=5)
    metrics = rec.observe(10, z, head)
    out = rec.arrays()

    zz = z.double().numpy()
    F = zz.T @ zz / zz.shape[0]
    W = head.linear.weight.detach().double().numpy().T  # applied as z @ W
    np.testing.assert_allclose(out["f_eigs"][0], np.linalg.eigvalsh(F)[::-1], rtol=1e-5)
    np.testing.assert_allclose(out["w_eigs"][0], np.linalg.eigvalsh((W + W.T) / 2)[::-1], rtol=1e-5, atol=1e-6)
    asym = np.linalg.norm(W - W.T) / np.linalg.norm(W)
    assert out["asymmetry"][0] == pytest.approx(asym, rel=1e-5) and asym > 0.5
    np.testing.assert_allclose(out["alignment"][0], _numpy_alignment(F, W.T), rtol=1e-4, atol=1e-6)
    assert out["step"].tolist() == [10] and out["step"].dtype == np.int64
    assert out["f_eigs"].dtype == np.float32 and out["f_eigs"].shape == (1, d)
    assert metrics["effective_rank"] == pytest.approx(_numpy_effective_rank(np.linalg.eigvalsh(F)), rel=1e-9)
    assert metrics["f_eig_max"] == pytest.approx(np.linalg.eigvalsh(F)[-1], rel=1e-9)
    assert metrics["f_eig_min"] == pytest.approx(np.linalg.eigvalsh(F)[0], rel=1e-9)
    assert metrics["asymmetry"] == pytest.approx(asym, rel=1e-9)


def test_alignment_is_one_and_asymmetry_zero_for_w_equal_to_f():
    d = 6
    z = _batch(d=d, seed=1)
    F = (z.double().T @ z.double() / z.shape[0]).float()
    head = LinearPredictor(d)
    with torch.no_grad():
        head.linear.weight.copy_(F)  # W = F (symmetric positive definite)
    rec = SpectrumRecorder(d, every=1)
    metrics = rec.observe(0, z, head)
    out = rec.arrays()
    np.testing.assert_allclose(out["alignment"][0], np.ones(d), atol=1e-6)
    assert out["asymmetry"][0] == 0.0 and metrics["asymmetry"] == 0.0


def test_alignment_of_a_rotation_is_its_cosine_and_zero_for_a_null_direction():
    # M = W^T rotates the plane of u_0, u_1 by 60 degrees and sends u_2 to zero.
    z = torch.diag(torch.tensor([3.0, 2.0, 1.0])) * math.sqrt(3)  # F = diag(9, 4, 1): u_j = e_j
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    M = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 0.0]])
    head = LinearPredictor(3)
    with torch.no_grad():
        head.linear.weight.copy_(M)  # forward z @ weight^T: the column map is weight
    rec = SpectrumRecorder(3, every=1)
    rec.observe(0, z, head)
    out = rec.arrays()
    np.testing.assert_allclose(out["f_eigs"][0], [9, 4, 1], rtol=1e-6)
    np.testing.assert_allclose(np.abs(out["alignment"][0]), [0.5, 0.5, 0.0], atol=1e-6)


def test_effective_rank_is_d_for_identity_and_one_for_rank_one():
    d = 16
    rec = SpectrumRecorder(d, every=1, rank_alarm=0)
    identity = rec.observe(0, torch.eye(d) * math.sqrt(d), None)  # z^T z / N = I
    rank_one = rec.observe(1, torch.randn(32, 1) * torch.randn(1, d), None)
    assert identity["effective_rank"] == pytest.approx(d, rel=1e-12)
    assert rank_one["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    out = rec.arrays()
    assert set(out) == {"step", "f_eigs", "effective_rank", "f_source"}  # no W without a linear head
    assert str(out["f_source"]) == "batch"
    with pytest.raises(ValueError, match="dim 16 but F at step 2 is 8-dim"):
        rec.observe(2, torch.randn(4, 8), None)


def test_direct_predictor_uses_its_own_f_and_is_aligned():
    torch.manual_seed(0)
    d, groups = 12, 3
    pred = DirectPredictor(d, groups=groups, backend="torch")
    for i in range(4):
        z = _batch(d=d, seed=i)
        pred(z)
    rec = SpectrumRecorder(d, every=1)
    metrics = rec.observe(0, torch.zeros(5, d), pred)  # z is not used: F is the predictor's EMA
    out = rec.arrays()
    F = pred.F.double().numpy()
    blocks = np.concatenate([np.linalg.eigvalsh(b) for b in F])
    np.testing.assert_allclose(out["f_eigs"][0], np.sort(blocks)[::-1], rtol=1e-5)
    W = pred.matrix.double().numpy()
    np.testing.assert_allclose(out["w_eigs"][0], np.sort(np.linalg.eigvalsh(W))[::-1], rtol=1e-5)
    # DirectPred's W = U diag(p) U^T with p > 0 shares F's eigenvectors: every cos(u_j, W u_j) is 1.
    np.testing.assert_allclose(out["alignment"][0], np.ones(d), atol=1e-5)
    assert metrics["asymmetry"] < 1e-6
    assert str(out["f_source"]) == "ema"


def test_off_diagonal_and_mlp_heads():
    d = 5
    off = OffDiagonalPredictor(d)
    with torch.no_grad():
        off.A.copy_(torch.triu(torch.ones(d, d), 1))  # W = I + strictly upper ones
    rec = SpectrumRecorder(d, every=1)
    rec.observe(0, _batch(d=d), off)
    W = off.matrix.detach().double().numpy()
    assert rec.arrays()["asymmetry"][0] == pytest.approx(np.linalg.norm(W - W.T) / np.linalg.norm(W), rel=1e-6)

    mlp = SpectrumRecorder(d, every=1)
    metrics = mlp.observe(0, _batch(d=d), MLPPredictor(d, hidden=8))
    assert "asymmetry" not in metrics and "w_eigs" not in mlp.arrays()


def test_collapse_alarm_fires_once_with_step_and_value():
    d = 8
    rec = SpectrumRecorder(d, every=2)
    healthy = _batch(d=d)
    collapsed = torch.randn(32, 1) * torch.ones(1, d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec.observe(0, healthy, None)
        rec.observe(2, collapsed, None)
        rec.observe(4, collapsed, None)
        rec.observe(6, healthy, None)
        rec.observe(8, collapsed, None)
    alarms = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(alarms) == 1
    assert "step 2" in str(alarms[0].message) and "effective rank of F is 1 " in str(alarms[0].message)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


class _Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"the recorder touched .{name} off a record step")


def test_no_work_off_record_steps():
    d = 8
    pred = DirectPredictor(d, backend="torch")
    z = _batch(d=d)
    pred(z)
    rec = SpectrumRecorder(d, every=5)
    with _CountOps() as counted:
        results = [rec.observe(step, z, pred) for step in (1, 2, 3, 4, 6, 99)]
    assert results == [None] * 6 and counted.ops == [] and len(rec) == 0
    assert rec.observe(7, _Untouchable(), _Untouchable()) is None
    with _CountOps() as counted:  # the counter does see a record step's work
        assert rec.observe(5, z, pred) is not None
    assert len(counted.ops) > 0
    disabled = SpectrumRecorder(d, every=0)
    assert disabled.observe(0, _Untouchable(), _Untouchable()) is None and len(disabled) == 0


def test_save_load_atomic_and_without_pickle(tmp_path):
    d = 6
    rec = SpectrumRecorder(d, every=1)
    for step in range(3):
        rec.observe(step * 10, _batch(d=d, seed=step), LinearPredictor(d))
    path = rec.save(tmp_path / "spectrum.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spectrum.npz"]  # no temporary file left
    loaded = load_spectrum(path)
    expected = rec.arrays()
    assert (
        set(loaded)
        == set(expected)
        == {"step", "f_eigs", "w_eigs", "asymmetry", "alignment", "effective_rank", "f_source"}
    )
    for name, array in expected.items():
        np.testing.assert_array_equal(loaded[name], array)
    assert loaded["f_eigs"].shape == (3, d) and loaded["asymmetry"].shape == (3,)
    rec.observe(30, _batch(d=d), LinearPredictor(d))
    rec.save(path)  # overwrites in place
    assert load_spectrum(path)["step"].tolist() == [0, 10, 20, 30]

    # A file holding a pickled object is refused, not executed.
    np.save(tmp_path / "evil.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with open(tmp_path / "evil.npy", "rb") as f:
        payload = f.read()
    import zipfile

    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as zf:
        zf.writestr("step.npy", payload)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_spectrum(tmp_path / "evil.npz")


def test_state_round_trip_continues_the_same_arrays():
    d = 6
    batches = [_batch(d=d, seed=i) for i in range(6)]
    heads = [LinearPredictor(d) for _ in range(6)]
    heads[4] = None  # a record without a linear W: its rows of w_eigs, alignment, asymmetry are NaN
    collapsed = torch.randn(16, 1) * torch.ones(1, d)

    def feed(rec, steps):
        for step in steps:
            rec.observe(step, collapsed if step == 1 else batches[step], heads[step])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = SpectrumRecorder(d, every=1)
        feed(straight, range(6))
        first = SpectrumRecorder(d, every=1)
        feed(first, range(3))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = SpectrumRecorder(d, every=1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.alarm_fired
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the alarm already fired before the checkpoint: no second warning
        feed(resumed, range(3, 6))
    a, b = straight.arrays(), resumed.arrays()
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert np.isnan(b["w_eigs"][4]).all() and not np.isnan(b["w_eigs"][3]).any()  # step 4 had no linear head
    with pytest.raises(ValueError, match="dim 6"):
        SpectrumRecorder(7, every=1).load_state_dict(first.state_dict())
