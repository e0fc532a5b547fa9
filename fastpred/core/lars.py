"""LARS, the layer-wise adaptive optimizer of BYOL's pretraining and of SimSiam's linear evaluation: used by the
trainer (`--optimizer lars`) and by `python -m fastpred.eval --protocol linear`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as BYOL and SimCLR use it, without any host synchronisation.

    For each parameter p of a group with ``lars_exclude=False``::

        g     = grad + weight_decay * p
        trust = eta * ||p|| / ||g||   if ||p|| > 0 and ||g|| > 0, else 1
        m     = momentum * m + trust * g
        p    -= lr * m

    A group with ``lars_exclude=True`` skips the trust ratio: SGD with momentum, with the group's own
    weight decay (``param_groups`` gives such groups weight decay 0, so they get neither, as in BYOL).
    The norm conditions are ``torch.where`` on the device, and each group updates with foreach ops.
    The momentum buffer starts at zero, so the first step is ``p -= lr * trust * g``. Parameters of one
    group must share a device (the per-parameter norms are stacked).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not eta > 0.0:
            raise ValueError(f"eta must be > 0, got {eta!r}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])  # new tensors, grads kept
            if group["lars_exclude"]:
                updates = grads
            else:
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                # Where a norm is 0 the ratio is inf or nan; torch.where selects 1 there without a sync.
                trust = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm, 1.0)
                updates = torch._foreach_mul(grads, list(trust.unbind(0)))
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss
