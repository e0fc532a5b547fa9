"""fastpred.train.optim: parameter groups, LARS, schedules and the target EMA."""

import io
import itertools
import math

import pytest
import torch
from torch import nn

from fastpred.train.optim import (
    LARS,
    build_optimizer,
    ema_update_,
    lr_at,
    param_groups,
    target_momentum_at,
)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))


# --- param_groups ---------------------------------------------------------------------------------


def test_param_groups_split_bias_and_norm():
    net = _net()
    groups = param_groups([net], 1e-4, exclude_bias_and_norm=True)
    assert len(groups) == 2
    decayed, excluded = groups
    assert decayed["weight_decay"] == 1e-4 and decayed["lars_exclude"] is False
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    assert {id(p) for p in decayed["params"]} == {id(net[0].weight), id(net[2].weight)}
    assert {id(p) for p in excluded["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias)}


def test_param_groups_one_group_dedupes_and_skips_frozen():
    net, head = _net(), nn.Linear(2, 2)
    head.weight = net[2].weight  # shared between modules (tied weights)
    head.bias.requires_grad_(False)
    groups = param_groups([net, head, net], 0.5, exclude_bias_and_norm=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.5 and groups[0]["lars_exclude"] is False
    ids = [id(p) for p in groups[0]["params"]]
    assert len(ids) == len(set(ids)) == 5  # net's five parameters; head adds nothing trainable and new
    assert id(head.bias) not in ids
    # The same holds with exclusion: no parameter in two groups.
    split = param_groups([net, head, net], 0.5, exclude_bias_and_norm=True)
    assert sorted(id(p) for g in split for p in g["params"]) == sorted(ids)


# --- LARS -----------------------------------------------------------------------------------------


def _reference_lars(params, grads, buffers, *, lr, momentum, weight_decay, eta, exclude):
    """LARS written out per parameter in float64, with host-side branches (the test oracle)."""
    out_params, out_buffers = [], []
    for p, g, m in zip(params, grads, buffers, strict=True):
        g = g + weight_decay * p
        if not exclude:
            p_norm, g_norm = float(p.norm()), float(g.norm())
            trust = eta * p_norm / g_norm if p_norm > 0 and g_norm > 0 else 1.0
            g = trust * g
        m = momentum * m + g
        out_params.append(p - lr * m)
        out_buffers.append(m)
    return out_params, out_buffers


def test_lars_matches_hand_computed_steps_float64():
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    zero = torch.zeros(2, 2, dtype=torch.float64)  # ||p|| = 0: trust falls back to 1
    params = [nn.Parameter(t.clone()) for t in (w, zero, b)]
    hp = {"lr": 0.7, "momentum": 0.9, "eta": 0.02}
    opt = LARS(
        [
            {"params": params[:2], "weight_decay": 0.1, "lars_exclude": False},
            {"params": params[2:], "weight_decay": 0.0, "lars_exclude": True},
        ],
        **hp,
    )
    ref = [w.clone(), zero.clone(), b.clone()]
    ref_buf = [torch.zeros_like(t) for t in ref]
    for _ in range(3):
        grads = [torch.randn_like(t) for t in ref]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref[:2], ref_buf[:2] = _reference_lars(ref[:2], grads[:2], ref_buf[:2], weight_decay=0.1, exclude=False, **hp)
        ref[2:], ref_buf[2:] = _reference_lars(ref[2:], grads[2:], ref_buf[2:], weight_decay=0.0, exclude=True, **hp)
        for p, g, expected in zip(params, grads, ref, strict=True):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-15)
            assert torch.equal(p.grad, g)  # the step must not modify the gradients it was given
    # The trust ratio actually shrank the weight's step (eta = 0.02): not plain SGD.
    plain, _ = _reference_lars([w], [params[0].grad], [torch.zeros_like(w)], weight_decay=0.1, exclude=True, **hp)
    assert not torch.allclose(plain[0], params[0].detach())


def test_lars_zero_gradient_and_missing_gradient():
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    q = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = LARS([p, q], lr=0.1, momentum=0.9, weight_decay=0.0)
    p.grad = torch.zeros(3, dtype=torch.float64)  # ||g|| = 0: trust 1, no nan
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(q.detach(), torch.ones(2, dtype=torch.float64)) and q not in opt.state


def test_lars_step_never_reads_device_values_on_host(monkeypatch):
    net = _net()
    opt = LARS(param_groups([net], 1e-4, exclude_bias_and_norm=True), lr=0.1)
    net(torch.randn(8, 4)).square().mean().backward()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside LARS.step")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()


def test_lars_state_round_trip_resumes_exactly():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(8, 4)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    opt = LARS(param_groups([net], 1e-3, exclude_bias_and_norm=True), lr=0.5)
    train(net, opt, 2)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    train(net, opt, 2)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _net()
    resumed.load_state_dict(saved["model"])
    resumed_opt = LARS(param_groups([resumed], 1e-3, exclude_bias_and_norm=True), lr=0.5)
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[1]["lars_exclude"] is True
    train(resumed, resumed_opt, 2)
    for a, b in zip(net.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_build_optimizer():
    net = _net()
    groups = param_groups([net], 1e-4, exclude_bias_and_norm=True)
    sgd = build_optimizer("sgd", groups, lr=0.03, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    assert all(g["momentum"] == 0.9 and g["lr"] == 0.03 for g in sgd.param_groups)
    lars = build_optimizer("lars", param_groups([net], 1e-4, exclude_bias_and_norm=True), lr=0.2, momentum=0.8)
    assert isinstance(lars, LARS) and lars.param_groups[0]["momentum"] == 0.8
    with pytest.raises(ValueError, match="sgd, lars"):
        build_optimizer("adam", groups, lr=0.1, momentum=0.9)


# --- schedules ------------------------------------------------------------------------------------


def test_lr_warmup_then_cosine():
    kw = {"total_steps": 110, "warmup_steps": 10, "base_lr": 2.0, "schedule": "cosine"}
    assert lr_at(0, **kw) == pytest.approx(0.2)
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(2.0)
    assert lr_at(10, **kw) == pytest.approx(2.0)
    assert lr_at(60, **kw) == pytest.approx(1.0)
    assert lr_at(110, **kw) == 0.0 and lr_at(500, **kw) == 0.0
    after = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(after))


def test_lr_constant_and_no_warmup():
    assert lr_at(0, total_steps=100, warmup_steps=0, base_lr=0.5, schedule="cosine") == 0.5
    assert lr_at(3, total_steps=100, warmup_steps=4, base_lr=0.4, schedule="constant") == pytest.approx(0.4)
    assert lr_at(1, total_steps=100, warmup_steps=4, base_lr=0.4, schedule="constant") == pytest.approx(0.2)
    assert lr_at(99, total_steps=100, warmup_steps=4, base_lr=0.4, schedule="constant") == 0.4
    with pytest.raises(ValueError, match="cosine, constant"):
        lr_at(0, total_steps=10, warmup_steps=0, base_lr=0.1, schedule="step")


def test_target_momentum_schedule():
    kw = {"total_steps": 100, "base": 0.996, "schedule": "cosine"}
    assert target_momentum_at(0, **kw) == pytest.approx(0.996)
    assert target_momentum_at(50, **kw) == pytest.approx(0.998)
    assert target_momentum_at(100, **kw) == pytest.approx(1.0)
    assert target_momentum_at(25, **kw) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert target_momentum_at(70, total_steps=100, base=0.99, schedule="constant") == 0.99


# --- target EMA -----------------------------------------------------------------------------------


def test_ema_update_matches_formula_and_leaves_online_alone():
    torch.manual_seed(0)
    online, target = _net(), _net()
    online_p, target_p = list(online.parameters()), list(target.parameters())
    before_online = [p.detach().clone() for p in online_p]
    before_target = [p.detach().clone() for p in target_p]
    target_buffers = [b.clone() for b in target.buffers()]
    online(torch.randn(8, 4))  # moves online's BatchNorm running statistics
    ema_update_(target_p, online_p, 0.9)
    for t, t0, o0, o in zip(target_p, before_target, before_online, online_p, strict=True):
        torch.testing.assert_close(t.detach(), 0.9 * t0 + 0.1 * o0)
        assert torch.equal(o.detach(), o0) and t.grad is None
    # Buffers are the caller's: the EMA touches parameters only.
    for b, b0 in zip(target.buffers(), target_buffers, strict=True):
        assert torch.equal(b, b0)
    ema_update_(target_p, online_p, 0.0)
    for t, o in zip(target_p, online_p, strict=True):
        assert torch.equal(t.detach(), o.detach())
    with pytest.raises(ValueError, match="target"):
        ema_update_(target_p[:1], online_p, 0.5)
