"""DirectPredictor's spectral filters (Zhuo et al., ICLR 2023: W = U diag(g(sigma)) U^T, sigma the batch's singular
values): the construction kernel and both backends against float64 evaluations written from the formulas, the
keep-W guard, autocast, two gloo ranks, the arguments, and the trainer's --filter."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from contract import assert_stream_matches, decaying_features, predictor_from, run_module
from devices import TRITON_DEVICES
from fastpred.kernels import predictor_from_eigh, predictor_from_eigh_ref
from test_distributed import SHARD_ROWS, _free_port, _rank_main
from test_train_cli import TINY, _error

from fastpred import DirectPredictor
from fastpred.train.__main__ import main

LOG_FILTERS = ("log", "log1p", "log1p_sq")
BACKENDS = ["torch", pytest.param("triton", marks=TRITON_DEVICES[0].marks)]


def _formula_W(s: torch.Tensor, U: torch.Tensor, filter: str, scale: float, eps: float) -> torch.Tensor:
    """float64 W of one (s, U) from the paper's filters, independent of fastpred's code."""
    W = predictor_from(U.double() @ torch.diag(s.double()) @ U.double().T, torch.eye(len(s), dtype=torch.float64),
                       alpha=0.5, eps=eps, filter=filter, scale=scale)
    return W


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("filter", LOG_FILTERS)
@pytest.mark.parametrize("n", [1, 7, 16])
def test_kernel_matches_the_formulas(device, filter, n):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(2, 2 * n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    s, U = torch.linalg.eigh(z.mT @ z / (2 * n))
    s, U = s.float(), U.float()
    if n > 1:
        s[:, 0] = -1e-3 * s[:, -1]  # a negative eigenvalue: sigma = 0 (log: -inf, which the floor takes)
    for scale, eps in ((64.0, 0.0), (5e3, 0.1)):  # at 64 several sigma < 1: "log" is negative there
        W, ok = predictor_from_eigh(s.to(device), U.to(device), 0.5, eps, filter=filter, scale=scale)
        ref, ref_ok = predictor_from_eigh_ref(s, U, 0.5, eps, filter=filter, scale=scale)
        assert ok.all() and ref_ok.all()
        for b in range(2):
            want = _formula_W(s[b], U[b], filter, scale, eps)
            # Same fp32 inputs: the only errors are the fp32 logs and product.
            torch.testing.assert_close(W[b].double().cpu(), want, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(ref[b].double(), want, rtol=1e-7, atol=1e-7)
        assert torch.equal(W, W.transpose(-1, -2))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_log_below_sigma_one_keeps_W(device):
    """log sigma is <= 0 everywhere when every sigma <= 1: no normalisation exists, W is kept (as for max s <= 0)."""
    s = torch.tensor([[0.0, 1e-3, 0.01], [0.1, 0.5, 1.0]], device=device)
    U = torch.eye(3, device=device).expand(2, 3, 3).contiguous()
    prev = torch.full((2, 3, 3), 7.0, device=device)
    W, ok = predictor_from_eigh(s, U, 0.5, 0.1, out=prev.clone(), filter="log", scale=50.0)
    assert ok.tolist() == [False, True] and torch.equal(W[0], prev[0])
    assert torch.equal(predictor_from_eigh_ref(s.cpu(), U.cpu(), 0.5, 0.1, filter="log", scale=50.0)[1], ok.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filter", LOG_FILTERS)
def test_stream_matches_float64(backend, filter):
    """The contract's accuracy rule along a stream (rho 0.3, freq 2): 1e-5 torch, 1e-4 triton, or twice fp32's."""
    batches = decaying_features(24, 12, steps=8, seed=3)
    pred = DirectPredictor(12, eps=0.05, freq=2, filter=filter, filter_scale=12.0, backend=backend)
    got = run_module(pred, batches)
    assert_stream_matches(got, batches, rho=0.3, eps=0.05, alpha=0.5, freq=2, filter=filter, scale=12.0,
                          floor=1e-5 if backend == "torch" else 1e-4)
    assert int(pred.unconverged_solves) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_and_autocast(backend):
    """Per-block filters; a bf16 autocast region changes nothing (the statistics switch it off)."""
    batches = decaying_features(16, 8, steps=3, seed=5)
    kw = dict(filter="log1p_sq", filter_scale=8.0, groups=2, backend=backend)
    plain, cast = DirectPredictor(8, **kw), DirectPredictor(8, **kw)
    blocks = [DirectPredictor(4, filter="log1p_sq", filter_scale=8.0, backend=backend) for _ in range(2)]
    for z in batches:
        plain(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast(z)
        for g, block in enumerate(blocks):
            block(z[:, 4 * g : 4 * g + 4])
    assert torch.equal(plain.W, cast.W) and torch.equal(plain.F, cast.F)
    for g, block in enumerate(blocks):
        torch.testing.assert_close(plain.W[g], block.W[0], rtol=1e-6, atol=1e-6)


def test_two_gloo_ranks_hold_the_single_process_W(tmp_path):
    batches = decaying_features(sum(SHARD_ROWS), 8, steps=4, seed=7)
    kw = dict(rho=0.99, freq=2, filter="log1p", filter_scale=32.0)
    mp.spawn(_rank_main, args=(_free_port(), batches, str(tmp_path), kw), nprocs=2, join=True)
    single = DirectPredictor(8, **kw)
    for z in batches:
        single(z)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(state["W"], single.W, rtol=1e-5, atol=1e-6)


def test_default_is_directpred_and_state_layout_is_unchanged():
    default, log = DirectPredictor(16), DirectPredictor(16, filter="log", filter_scale=256)
    assert default.filter == "power" and repr(default) == "DirectPredictor(16, rho=0.3, eps=0.1, alpha=0.5, freq=1)"
    assert "filter='log', filter_scale=256.0" in repr(log)
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in log.state_dict().items()}
    log.load_state_dict(default.state_dict())  # a checkpoint of either loads into the other


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(filter="sqrt"), "filter must be one of power, log, log1p, log1p_sq"),
        (dict(filter="log1p"), "filter='log1p' needs filter_scale > 0"),
        (dict(filter="log", filter_scale=0.0), "needs filter_scale > 0"),
        (dict(filter="log", filter_scale=float("inf")), "needs filter_scale > 0"),
        (dict(filter="log1p_sq", filter_scale=64, alpha=1.0), "alpha applies only to filter='power'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DirectPredictor(8, **kwargs)


def test_trainer_flag(capsys, tmp_path):
    assert "--filter applies only with --predictor directpred" in _error(capsys, ["--filter", "log", "--predictor",
                                                                                   "mlp"])
    for argv in (["--predictor", "directcopy"], ["--alpha", "0.3"]):
        assert "--filter log takes no exponent" in _error(capsys, ["--filter", "log", *argv])
    assert main([*TINY, "--filter", "log1p", "--out", str(tmp_path / "run")]) == 0
    assert '"filter": "log1p"' in (tmp_path / "run" / "config.json").read_text()
    assert os.path.exists(tmp_path / "run" / "summary.json")
