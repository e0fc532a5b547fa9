"""DirectPredictor against an independent float64 evaluation of the contract (tests/contract.py)."""

import warnings

import pytest
import torch
from contract import allowed_error, assert_stream_matches, decaying_features, evaluate_stream, rel_err, run_module
from devices import DEVICES

from fastpred import DirectPredictor

TORCH_FLOOR = 1e-5  # DESIGN: the torch backend's accuracy bound where float32 allows it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("rho", [0.3, 0.99])
def test_stream_matches_float64_contract(rho, freq, alpha, device):
    batches = decaying_features(96, 32, steps=60, seed=int(rho * 100) + freq)
    pred = DirectPredictor(32, rho=rho, eps=0.1, alpha=alpha, freq=freq).to(device)
    got = run_module(pred, batches, device)
    assert_stream_matches(got, batches, rho=rho, eps=0.1, alpha=alpha, freq=freq, floor=TORCH_FLOOR)
    assert int(pred.num_folds) == 60 and int(pred.skipped_updates) == 0


def test_output_uses_previous_W():
    pred = DirectPredictor(6)
    z1, z2 = torch.randn(10, 6), torch.randn(10, 6)
    assert torch.equal(pred(z1), z1)  # before any statistics W is the identity
    W_after_first = pred.W[0].clone()
    assert not torch.equal(W_after_first, torch.eye(6))
    torch.testing.assert_close(pred(z2), z2 @ W_after_first)


def test_rank_deficient_F_with_more_features_than_rows():
    g = torch.Generator().manual_seed(3)
    mixing = torch.randn(5, 40, generator=g)
    batches = [torch.randn(12, 5, generator=g) @ mixing for _ in range(50)]  # rank 5 of 40, N = 12 < d
    for alpha in (0.5, 1.0):
        got = run_module(DirectPredictor(40, rho=0.3, eps=0.05, alpha=alpha), batches)
        assert_stream_matches(got, batches, rho=0.3, eps=0.05, alpha=alpha, freq=1, floor=TORCH_FLOOR)


def test_repeated_eigenvalues():
    g = torch.Generator().manual_seed(4)
    d = 16
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    spectrum = torch.tensor([4.0] * 5 + [1.0] * 6 + [0.0] * 5, dtype=torch.float64)
    z = (d**0.5 * spectrum.sqrt()[:, None] * Q.T).float()  # z^T z / N = Q diag(spectrum) Q^T exactly
    batches = [z] * 50
    got = run_module(DirectPredictor(d, rho=0.99), batches)
    assert_stream_matches(got, batches, rho=0.99, eps=0.1, alpha=0.5, freq=1, floor=TORCH_FLOOR)
    W = got[-1][2].double()
    eigenvalues = torch.linalg.eigvalsh(W)
    expected = torch.tensor([0.1] * 5 + [0.6] * 6 + [1.1] * 5, dtype=torch.float64)
    # sqrt turns fp32 noise of ~1e-7 on the zero eigenvalues into ~1e-3.5: the accuracy rule above allows it
    torch.testing.assert_close(eigenvalues, expected, atol=1e-3, rtol=0)


def test_all_zero_first_batch_keeps_identity_then_folds_normally():
    pred = DirectPredictor(8, rho=0.3)
    pred(torch.zeros(4, 8))
    assert torch.equal(pred.W[0], torch.eye(8)) and torch.equal(pred.F[0], torch.zeros(8, 8))
    assert int(pred.num_folds) == 1  # a zero batch is finite: it is folded, only W has nothing to use
    batches = [torch.zeros(4, 8)] + decaying_features(16, 8, steps=50, seed=5)
    pred = DirectPredictor(8, rho=0.3)
    assert_stream_matches(run_module(pred, batches), batches, rho=0.3, eps=0.1, alpha=0.5, freq=1, floor=TORCH_FLOOR)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_batch_is_skipped_counted_and_warned_once(bad):
    pred = DirectPredictor(8)
    for z in decaying_features(16, 8, steps=3, seed=6):
        pred(z)
    F, W, folds = pred.F.clone(), pred.W.clone(), int(pred.num_folds)
    poisoned = torch.randn(16, 8)
    poisoned[3, 5] = bad
    with pytest.warns(RuntimeWarning, match="non-finite"):
        pred(poisoned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second skip is counted, not warned about again
        pred(poisoned)
    assert torch.equal(pred.F, F) and torch.equal(pred.W, W)
    assert int(pred.skipped_updates) == 2 and int(pred.num_folds) == folds
    pred(torch.randn(16, 8))
    assert int(pred.num_folds) == folds + 1 and torch.isfinite(pred.W).all()


def test_overflowing_batch_is_skipped():
    pred = DirectPredictor(4)
    pred(torch.randn(8, 4))
    F = pred.F.clone()
    with pytest.warns(RuntimeWarning):
        pred(torch.full((8, 4), 1e30))  # finite values whose squares overflow fp32
    assert torch.equal(pred.F, F) and int(pred.skipped_updates) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(dtype):
    batches = [z.to(dtype) for z in decaying_features(64, 16, steps=50, seed=7)]
    pred = DirectPredictor(16, rho=0.99)
    got = run_module(pred, batches)
    assert got[0][0].dtype == dtype
    # The statistics are exact fp32 sums of the half-precision values, so the float64 oracle of those
    # values is the reference; the output itself is rounded to the input's precision.
    widened = [z.float() for z in batches]
    exact = evaluate_stream(widened, rho=0.99, eps=0.1, alpha=0.5, freq=1, dtype=torch.float64)
    plain = evaluate_stream(widened, rho=0.99, eps=0.1, alpha=0.5, freq=1, dtype=torch.float32)
    for (out, F, W), ref, fp32 in zip(got, exact, plain, strict=True):
        assert rel_err(F, ref.F) <= allowed_error(fp32.F, ref.F, TORCH_FLOOR)
        assert rel_err(W, ref.W) <= allowed_error(fp32.W, ref.W, TORCH_FLOOR)
        assert rel_err(out, ref.out) <= 2 * torch.finfo(dtype).eps


def test_state_dict_mid_stream_continues_identically():
    batches = decaying_features(32, 12, steps=40, seed=8)
    first = DirectPredictor(12, rho=0.99, freq=3)
    for z in batches[:17]:
        first(z)
    second = DirectPredictor(12, rho=0.99, freq=3)
    second.load_state_dict(first.state_dict())
    counters = {"num_folds", "skipped_updates", "unconverged_solves", "full_solve_next"}
    assert set(first.state_dict()) == {"F", "U", "W"} | counters
    for z in batches[17:]:
        assert torch.equal(first(z), second(z))
        assert torch.equal(first.F, second.F) and torch.equal(first.W, second.W)
    assert torch.equal(first.num_folds, second.num_folds)


def test_eval_mode_folds_nothing():
    pred = DirectPredictor(6)
    pred(torch.randn(8, 6))
    pred.eval()
    F, W = pred.F.clone(), pred.W.clone()
    z = torch.randn(8, 6)
    torch.testing.assert_close(pred(z), z @ W[0])
    assert torch.equal(pred.F, F) and int(pred.num_folds) == 1


def test_gradient_flows_to_input_not_statistics():
    pred = DirectPredictor(6)
    pred(torch.randn(8, 6))
    z = torch.randn(8, 6, requires_grad=True)
    W = pred.W[0].clone()
    pred(z).sum().backward()  # W is refreshed in place after the product; autograd keeps the one it used
    torch.testing.assert_close(z.grad, torch.ones(8, 6) @ W.T)
    assert not pred.F.requires_grad and not pred.W.requires_grad


def test_directcopy_needs_no_eigenvectors(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("alpha = 1 must not need a full eigh")

    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    batches = decaying_features(32, 10, steps=50, seed=9)
    got = run_module(DirectPredictor(10, alpha=1.0, eps=0.1), batches)
    monkeypatch.undo()
    assert_stream_matches(got, batches, rho=0.3, eps=0.1, alpha=1.0, freq=1, floor=TORCH_FLOOR)


def test_trainable_W_is_trained_between_refreshes_and_reset_at_each():
    batches = decaying_features(32, 8, steps=6, seed=10)
    pred = DirectPredictor(8, freq=3, trainable=True)
    assert isinstance(pred.W, torch.nn.Parameter) and "W" in dict(pred.named_parameters())
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    exact = evaluate_stream(batches, rho=0.3, eps=0.1, alpha=0.5, freq=3, dtype=torch.float64)
    for t, z in enumerate(batches):
        opt.zero_grad()
        before = pred.W.detach().clone()
        pred(z).square().sum().backward()
        if (t + 1) % 3 == 0:  # a refresh resets W from F, whatever training did to it
            assert rel_err(pred.W[0].detach(), exact[t].W) <= TORCH_FLOOR
        else:
            assert torch.equal(pred.W.detach(), before)
        assert pred.W.grad is not None and pred.W.grad.abs().sum() > 0
        opt.step()
        if (t + 1) % 3 != 0:
            assert not torch.equal(pred.W.detach(), before)


def test_groups_equal_independent_predictors():
    batches = decaying_features(24, 12, steps=20, seed=11)
    grouped = DirectPredictor(12, groups=3, rho=0.99)
    singles = [DirectPredictor(4, rho=0.99) for _ in range(3)]
    for z in batches:
        out = grouped(z)
        parts = [p(z[:, 4 * i : 4 * i + 4]) for i, p in enumerate(singles)]
        torch.testing.assert_close(out, torch.cat(parts, dim=1))
    for i, p in enumerate(singles):
        torch.testing.assert_close(grouped.W[i], p.W[0])
    assert grouped.matrix.shape == (12, 12) and torch.equal(grouped.matrix[:4, 4:], torch.zeros(4, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 0}, "dim"),
        ({"dim": 8, "rho": 1.0}, "rho"),
        ({"dim": 8, "rho": -0.1}, "rho"),
        ({"dim": 8, "eps": -1e-3}, "eps"),
        ({"dim": 8, "alpha": 0.0}, "alpha"),
        ({"dim": 8, "freq": 0}, "freq"),
        ({"dim": 8, "groups": 3}, "groups"),
        ({"dim": 8, "solver": "qr"}, "solver must be one of jacobi, orth"),
        ({"dim": 128, "solver": "orth"}, r"solver='orth' needs dim / groups <= 64.*got 128"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DirectPredictor(**kwargs)


@pytest.mark.parametrize(
    "z, match",
    [
        (torch.randn(4, 7), r"expected input of shape \(N, 8\), got \(4, 7\)"),
        (torch.randn(4, 2, 8), r"got \(4, 2, 8\)"),
        (torch.randn(0, 8), "at least one row"),
        (torch.ones(4, 8, dtype=torch.int64), "floating-point"),
    ],
)
def test_bad_input_names_expected_and_got(z, match):
    with pytest.raises(ValueError, match=match):
        DirectPredictor(8)(z)


def test_extra_repr_and_buffers():
    pred = DirectPredictor(16, rho=0.99, eps=0.05, alpha=1.0, freq=2, groups=4)
    assert repr(pred) == "DirectPredictor(16, rho=0.99, eps=0.05, alpha=1.0, freq=2, groups=4)"
    assert pred.F.shape == (4, 4, 4) and pred.W.shape == (4, 4, 4)
    assert torch.equal(pred.matrix, torch.eye(16))
    assert repr(DirectPredictor(128, groups=2, solver="orth")) == "DirectPredictor(128, rho=0.3, eps=0.1, alpha=0.5, " \
        "freq=1, groups=2, solver='orth')"


def test_dtype_casts_keep_fp32_statistics():
    pred = DirectPredictor(8)
    pred(torch.randn(16, 8))
    F = pred.F.clone()
    pred.to(torch.bfloat16)  # as when a whole model is cast; W, F and U stay exact fp32
    assert pred.F.dtype == pred.W.dtype == pred.U.dtype == torch.float32 and torch.equal(pred.F, F)
    out = pred(torch.randn(16, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and int(pred.num_folds) == 2
    trainable = DirectPredictor(8, trainable=True).half()
    assert trainable.W.dtype == torch.float16 and trainable.F.dtype == torch.float32  # a parameter follows the cast


def test_works_inside_torch_compile():
    # Users compile their whole model; the predictor's host-side control flow may graph-break, but the
    # compiled run must give eager's outputs and state.
    torch.manual_seed(0)
    encoder = torch.nn.Linear(32, 16)
    eager, compiled = DirectPredictor(16), DirectPredictor(16)

    def step(pred, x):
        return pred(encoder(x))

    compiled_step = torch.compile(step)
    for _ in range(4):
        x = torch.randn(64, 32)
        torch.testing.assert_close(compiled_step(compiled, x), step(eager, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.F, eager.F, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled.W, eager.W, rtol=1e-5, atol=1e-6)
    assert int(compiled.num_folds) == int(eager.num_folds) == 4
