"""IsoLoss (`--loss iso`, fastpred/train/losses.py): its gradient against a float64 evaluation of the authors' formula,
the per-eigenmode rates it equalises, and short trainer runs with every kind of head, both DirectPredictor backends,
resume and torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastpred.train.__main__ import main
from fastpred.train.config import Config, ConfigError, from_json, resolve, resumed, to_json
from fastpred.train.losses import SCALE, iso_term
from fastpred.train.step import ssl_loss

TINY = ["--data", "synthetic", "--proj-dim", "8", "--proj-hidden", "16", "--batch-size", "8", "--resolution", "8",
        "--log-every", "1", "--progress", "plain", "--spectrum-every", "0"]


def _inputs(n=12, d=7, seed=0):
    """Rows [view 1; view 2] (n = 2B), a symmetric positive definite W with a wide spectrum, targets t."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    w = torch.logspace(-2, 0, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g), U, w, torch.randn(n, d, generator=g)


def _authors_isoloss(z, U, w, t, method):
    """fmi-basel/implicit-var-reg solo/losses/isoloss.py `isoloss_func`, in float64, both directions averaged as
    fastpred's loss does; psqrt = z W^(1/2) from the eigendecomposition, as solo/methods/directpred.py builds it.
    The authors' factor -2 belongs to BYOL's 2 - 2 cos; SimSiam's -cos takes -1 (SCALE)."""
    W, W_half = U @ torch.diag(w) @ U.T, U @ torch.diag(w.sqrt()) @ U.T
    p, psqrt = z @ W, z @ W_half
    zt = torch.cat(t.chunk(2)[::-1])  # each view predicts the other's target
    sim = (z * zt.detach()).sum(dim=1) / (torch.norm(p, dim=1) * torch.norm(zt, dim=1)).detach() - 0.5 * (
        (p * zt).sum(dim=1) / (torch.norm(p, dim=1) ** 3 * torch.norm(zt, dim=1))
    ).detach() * torch.norm(psqrt, dim=1) ** 2
    return -SCALE[method] * sim.mean()


@pytest.mark.parametrize("method", ["byol", "simsiam"])
def test_gradient_is_the_authors_isoloss_and_value_the_cosine_loss(method):
    z, U, w, t = _inputs()
    W32 = (U @ torch.diag(w) @ U.T).float()
    z32 = z.clone().requires_grad_()
    p = z32.detach() @ W32  # the trainer feeds the predictor z.detach() under --loss iso
    loss = ssl_loss(p, t, method) + iso_term(z32, p, t, method)
    loss.backward()

    z64 = z.double().requires_grad_()
    _authors_isoloss(z64, U, w, t.double(), method).backward()
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-5, atol=1e-7)
    # The value is the method's cosine loss, evaluated here directly in float64.
    p64, t64 = z.double() @ U @ torch.diag(w) @ U.T, torch.cat(t.double().chunk(2)[::-1])
    cos = (p64 * t64).sum(1) / (p64.norm(dim=1) * t64.norm(dim=1))
    expected = (2 - 2 * cos).mean() if method == "byol" else -cos.mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)


def test_every_eigenmode_learns_at_one_rate():
    """In W's eigenbasis the cosine loss's gradient on mode j of z is w_j times the loss's gradient on mode j of the
    prediction (the eigenvalue is a learning-rate multiplier, spread 100x here); IsoLoss's is 1 times, every mode."""
    z, U, w, t = _inputs(n=64, d=6, seed=1)
    z, t = z.double(), t.double()
    W = U @ torch.diag(w) @ U.T

    p = (z @ W).requires_grad_()
    ssl_loss(p, t, "byol").backward()
    at_p = (p.grad @ U).norm(dim=0)  # the loss's gradient at the prediction, per eigenmode

    def at_z(iso: bool) -> torch.Tensor:
        zz = z.clone().requires_grad_()
        pp = (zz.detach() if iso else zz) @ W
        (ssl_loss(pp, t, "byol") + (iso_term(zz, pp, t, "byol") if iso else 0)).backward()
        return (zz.grad @ U).norm(dim=0)

    torch.testing.assert_close(at_z(iso=False) / at_p, w)  # cosine: mode j learns at rate w_j
    torch.testing.assert_close(at_z(iso=True) / at_p, torch.ones_like(w))  # IsoLoss: every mode at rate 1


def test_config_errors_and_resume_keep_the_loss(tmp_path):
    with pytest.raises(ConfigError, match="--loss iso .* needs one"):
        resolve({"loss": "iso", "predictor": "none"})
    for predictor in ("directpred", "directcopy", "linear", "mlp", "offdiag"):
        assert resolve({"loss": "iso", "predictor": predictor}).loss == "iso"
    saved = from_json(to_json(resolve({"loss": "iso"})))
    assert saved.loss == "iso"
    with pytest.raises(ConfigError, match="--loss cosine contradicts"):
        resumed(saved, {"loss": "cosine"})
    old = json.loads(to_json(Config()))
    del old["loss"]  # a run folder written before --loss existed resumes with the loss it ran
    assert from_json(json.dumps(old)).loss == "cosine"


@pytest.mark.parametrize("predictor,extra", [
    ("directpred", []), ("directpred", ["--backend", "triton"]), ("linear", []), ("mlp", ["--pred-hidden", "16"]),
])
def test_iso_trains_every_head(tmp_path, one_torch_thread, predictor, extra):
    """Same first loss as the cosine run (same value, the update differs), then another trajectory."""
    runs = {}
    for loss in ("cosine", "iso"):
        runs[loss] = tmp_path / loss
        argv = [*TINY, "--synthetic-steps", "3", "--epochs", "1", "--predictor", predictor, *extra, "--loss", loss,
                "--out", str(runs[loss])]
        assert main(argv) == 0
    cos, iso = (_losses(runs[k]) for k in ("cosine", "iso"))
    assert len(iso) == 3 and all(torch.isfinite(torch.tensor(iso)))
    assert cos[0] == iso[0] and cos[1:] != iso[1:]
    assert json.loads((runs["iso"] / "config.json").read_text())["loss"] == "iso"


def _losses(run) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"]


def test_resume_continues_the_iso_run_bitwise(tmp_path, one_torch_thread):
    argv = [*TINY, "--synthetic-steps", "6", "--epochs", "1", "--loss", "iso", "--seed", "3"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert main([*argv, "--max-steps", "3", "--out", str(tmp_path / "parted")]) == 0
    assert main(["--resume", str(tmp_path / "parted"), "--max-steps", "0", "--progress", "plain"]) == 0
    whole, parted = _losses(tmp_path / "whole"), _losses(tmp_path / "parted")
    assert len(whole) == 6 and whole == parted


def test_iso_on_the_digits_decreases_the_loss(tmp_path, one_torch_thread):
    """The user's cache (written once, ~10 s, on a machine that has none) and a 12-step run."""
    pytest.importorskip("ffcv", reason="the digits path needs fastpred[data]")
    run = tmp_path / "run"
    assert main(["--proj-dim", "16", "--batch-size", "64", "--max-steps", "12", "--log-every", "1", "--knn-every",
                 "0", "--final-probe", "false", "--progress", "plain", "--workers", "1", "--loss", "iso",
                 "--out", str(run)]) == 0
    losses = _losses(run)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3  # measured: 0.916 -> 0.514


def test_iso_linear_head_under_torchrun(tmp_path):
    """Two gloo processes: the head sees z.detach() inside DDP's forward and still gets its (all-reduced) gradient."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastpred.train", *TINY, "--synthetic-steps", "3", "--epochs", "1", "--predictor", "linear", "--loss", "iso",
           "--out", str(run)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    losses = _losses(run)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("predictor", ["linear", "mlp", "offdiag"])
def test_trained_heads_learn_from_the_cosine_loss_the_encoder_from_iso(predictor, one_torch_thread):
    """One step of the Learner: the head sees z.detach() and gets the cosine loss's gradient; the projection z gets
    exactly the loss's gradient at the prediction p (IsoLoss), nothing through the head."""
    from fastpred.train.step import Learner

    given = {"data": "synthetic", "proj_dim": 8, "proj_hidden": 16, "batch_size": 8, "resolution": 8,
             "predictor": predictor, "loss": "iso", **({"pred_hidden": 16} if predictor == "mlp" else {})}
    cfg = resolve(given)
    learner = Learner(cfg, rank=0, world_size=1, device=torch.device("cpu"), num_classes=10, steps_per_epoch=3)
    seen = {}

    def on_z(module, inputs, z):
        seen["z"] = z
        z.register_hook(lambda grad: seen.update(grad_z=grad))

    learner.online.projector.register_forward_hook(on_z)
    learner.online.predictor.register_forward_hook(lambda m, inputs, p: seen.update(p=p, head_input=inputs[0]))
    learner.target.projector.register_forward_hook(lambda m, inputs, t: seen.update(t=t))
    g = torch.Generator().manual_seed(0)
    learner.optimize(torch.rand(8, 3, 8, 8, generator=g), torch.rand(8, 3, 8, 8, generator=g),
                     torch.zeros(8, dtype=torch.long))

    assert not seen["head_input"].requires_grad
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in learner.online.predictor.parameters()
               if q.requires_grad)
    p = seen["p"].detach().clone().requires_grad_()
    ssl_loss(p, seen["t"], "byol").backward()
    torch.testing.assert_close(seen["grad_z"], p.grad, rtol=1e-5, atol=1e-8)
