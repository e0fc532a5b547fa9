"""Optimizers, schedules and the target-network EMA of the trainer.

Everything here that runs inside a training step (``ema_update_``, and ``LARS.step``, from ``fastpred.core.lars``)
stays on the device: no ``.item()``, no Python branch on a device tensor. The schedules are host-side floats that
the loop writes into ``group["lr"]`` each step (setting a Python float is not a synchronisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fastpred.core.lars import LARS

OPTIMIZERS = ("sgd", "lars")
SCHEDULES = ("cosine", "constant")


def param_groups(modules: Iterable[nn.Module], weight_decay: float, *, exclude_bias_and_norm: bool) -> list[dict]:
    """Optimizer parameter groups over the trainable parameters of ``modules``, each parameter once.

    With ``exclude_bias_and_norm`` (BYOL's LARS setting), parameters with ndim <= 1 (biases, BatchNorm
    weights) go to a group with weight decay 0 and ``lars_exclude=True`` (no trust-ratio adaptation),
    the rest to a group with ``weight_decay`` and ``lars_exclude=False``. Otherwise one group holds all,
    with ``lars_exclude=False``. Parameters with ``requires_grad=False`` are left out; modules that share a
    parameter contribute it once (deduplicated by identity). An empty group is dropped.
    """
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not exclude_bias_and_norm:
        groups = [{"params": params, "weight_decay": weight_decay, "lars_exclude": False}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lars_exclude": False},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True},
        ]
    return [group for group in groups if group["params"]]


def with_predictor_group(
    encoder: Iterable[nn.Module], predictor: nn.Module, *, weight_decay: float, exclude_bias_and_norm: bool,
    base_lr: float, pred_base_lr: float, pred_weight_decay: float, pred_lr_fixed: bool,
) -> list[dict]:
    """``param_groups`` of the encoder, then the predictor's own groups, marked ``predictor=True`` with its base
    learning rate and weight decay, and ``fixed_lr`` to keep its learning rate constant (SimSiam) while the
    encoder's follows the schedule. `group_lr` reads the marks each step."""
    groups = param_groups(encoder, weight_decay, exclude_bias_and_norm=exclude_bias_and_norm)
    head = param_groups([predictor], pred_weight_decay, exclude_bias_and_norm=exclude_bias_and_norm)
    for group in head:
        group.update(predictor=True, lr_ratio=pred_base_lr / base_lr, base_lr=pred_base_lr, fixed_lr=pred_lr_fixed)
    return groups + head


def group_lr(group: dict, scheduled_lr: float) -> float:
    """A group's learning rate for this step: the schedule's, scaled for a predictor group with its own base rate,
    or that base rate throughout for a predictor group with ``fixed_lr`` (no warm-up, no decay, as SimSiam)."""
    if not group.get("predictor"):
        return scheduled_lr
    return group["base_lr"] if group["fixed_lr"] else scheduled_lr * group["lr_ratio"]


def build_optimizer(name: str, param_groups: list[dict], *, lr: float, momentum: float) -> torch.optim.Optimizer:
    """``"sgd"`` (torch SGD with momentum) or ``"lars"`` over ``param_groups`` (each carries its weight decay)."""
    if name == "sgd":
        # SGD ignores the groups' extra "lars_exclude" key; their weight decay applies as plain L2.
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(param_groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float, schedule: str) -> float:
    """Learning rate at ``step`` (counted from 0): linear warm-up, then cosine decay or constant.

    Warm-up: ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``, so step 0 gets
    ``base_lr / warmup_steps`` and the last warm-up step ``base_lr``. Then ``"cosine"`` decays from
    ``base_lr`` at ``warmup_steps`` to 0 at ``total_steps`` (and stays 0 after); ``"constant"`` keeps ``base_lr``.
    """
    _check_schedule(schedule)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def target_momentum_at(step: int, *, total_steps: int, base: float, schedule: str) -> float:
    """The target EMA coefficient tau at ``step``.

    ``"cosine"`` is BYOL's ``tau = 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2``: ``base`` at
    step 0, rising to 1 at ``total_steps`` (and 1 after). ``"constant"`` is ``base``.
    """
    _check_schedule(schedule)
    if schedule == "constant":
        return base
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def symmetrize_(weight: Tensor) -> None:
    """W <- (W + W^T) / 2 in place (a square weight): the same arithmetic on every rank keeps DDP replicas equal."""
    weight.copy_((weight + weight.T) / 2)


@torch.no_grad()
def ema_update_(target_params: list[Tensor], online_params: list[Tensor], momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for every pair, in one foreach op.

    Parameters only. The target's buffers (BatchNorm running statistics) are deliberately not copied
    or averaged: the target runs its forward passes in training mode, where BatchNorm normalises with
    the batch's own statistics, so its running statistics never enter the loss; its own forward passes
    keep them consistent with its own weights, which copying the online network's statistics would
    break (they describe the activations of different weights). This is what BYOL implementations in
    PyTorch do. Pass lists built once (``list(model.parameters())``), in the same order for both.
    """
    if len(target_params) != len(online_params):
        raise ValueError(f"ema_update_ got {len(target_params)} target and {len(online_params)} online tensors")
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
