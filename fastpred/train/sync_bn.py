"""BatchNorm with statistics over the global batch of a process group, and no host wait.

``nn.SyncBatchNorm`` reads per-rank counts through a boolean mask (one host synchronisation per layer and
forward), has no CPU kernel (gloo runs cannot use it) and makes Dynamo break the graph. This one costs one
``all_reduce`` of 3C+1 numbers per layer in the forward and one of 2C in the backward, all on the device,
in plain ``torch.distributed`` calls that gloo runs and that Dynamo rewrites into traceable functional
collectives.

Statistics (per channel, over N and every spatial position), in fp32: each rank reduces its own shard with
``var_mean`` (one numerically stable pass), then sends, relative to a shift c that every rank holds
identically,

    [n_r m_r,  n_r (m_r - c),  n_r v_r + n_r (m_r - c)^2,  n_r]

(m_r, v_r: the shard's mean and biased variance, n_r its element count per channel). Summed over ranks:
[sum x, sum (x - c), sum (x - c)^2, N], so mean = S0 / N and var = S2 / N - (S1 / N)^2. This is Chan's
parallel combination written as a sum, which one all_reduce can do: the within-shard spread comes from a
stable reduction, and the only subtraction left is (S1 / N)^2 = (mean - c)^2, small when c is close to the
mean. The plain E[x^2] - mean^2 loses about 1e-7 (mean / std)^2 of the variance in fp32 (6% at mean / std =
1000). The shift is the global mean of this layer's previous training forward, a non-persistent buffer (the
state_dict keys stay nn.BatchNorm's): it is written only from all-reduced numbers by the same arithmetic on
every rank, so it stays equal everywhere without being sent. Before the first step it is zero, which is the
plain formula, clamped at zero. The mean is sent separately (S0) rather than rebuilt as c + S1 / N so that
nothing the backward needs depends on the shift buffer, which the forward overwrites (see the forward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]  # every dim of (N, C, ...) but C


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))  # (C,) -> (1, C, 1, ...) to broadcast against x


class _SyncBatchNormFn(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with mean, var over every rank's batch.

    Returns (y, mean, biased var, global count); only y is differentiable. Statistics and gradients are
    computed in fp32 (fp64 for fp64 inputs) whatever autocast says; y and dx take x's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, shift, eps, group):
        c = x.shape[1]
        acc = torch.promote_types(x.dtype, torch.float32)
        n_r = x.numel() // c if c else 0
        with torch.autocast(x.device.type, enabled=False):
            shift = shift.to(acc)
            if n_r > 0:
                var_r, mean_r = torch.var_mean(x.to(acc), dim=_reduce_dims(x), correction=0)
                d = mean_r - shift
                local = torch.cat([mean_r * n_r, d * n_r, (var_r + d * d) * n_r, d.new_full((1,), n_r)])
            else:  # an empty shard still takes part in the collective
                local = x.new_zeros(3 * c + 1, dtype=acc)
            dist.all_reduce(local, group=group)
            total = local  # (3C + 1,) summed over ranks, identical on every rank
            count = total[3 * c]
            # mean and var are read from the collective's output alone, never from the shift: a compiled
            # backward may recompute cheap values from graph inputs instead of saving them, and the shift
            # buffer has been overwritten by then (pytorch/pytorch#197039, silently wrong gradients).
            mean = total[:c] / count
            dm = total[c : 2 * c] / count  # mean - shift
            var = (total[2 * c : 3 * c] / count - dm * dm).clamp_min(0.0)
            invstd = torch.rsqrt(var + eps)
            w = None if weight is None else weight.to(acc)
            b = None if bias is None else bias.to(acc)
            # The inference kernel applies the given statistics in fp32 and returns x's dtype (bf16 in, bf16 out).
            y = F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = mean.dtype
        dims = _reduce_dims(x)
        dx = dw = db = None
        with torch.autocast(x.device.type, enabled=False):
            dyf = dy.to(acc)
            xhat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(invstd, x)
            sum_dy = dyf.sum(dims)
            sum_dy_xhat = (dyf * xhat).sum(dims)
            # weight and bias: this rank's share only; DDP sums or averages them across ranks like any parameter.
            if need_w:
                dw = sum_dy_xhat.to(weight.dtype)
            if need_b:
                db = sum_dy.to(weight.dtype if weight is not None else acc)
            if need_x:
                # dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the global batch:
                # the global statistics depend on every rank's x. One all_reduce of both sums, packed.
                sums = torch.cat([sum_dy, sum_dy_xhat])
                dist.all_reduce(sums, group=ctx.group)
                c = x.shape[1]
                g_dy = _per_channel(sums[:c] / count, x)
                g_dy_xhat = _per_channel(sums[c:] / count, x)
                scale = invstd if weight is None else invstd * weight.to(acc)
                dx = ((dyf - g_dy - xhat * g_dy_xhat) * _per_channel(scale, x)).to(x.dtype)
        return dx, dw, db, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of ``process_group`` (default: the world) in training mode.

    Any input (N, C, ...) (1d, 2d, 3d). With no process group initialised, a world of one, or in eval mode
    it is ``nn.BatchNorm`` exactly (same ``F.batch_norm`` call). In training mode across ranks: one
    all_reduce per forward and one per backward, no host synchronisation, fp32 statistics under autocast,
    running statistics updated with the unbiased global variance as ``nn.BatchNorm`` updates them. Every
    rank must run the forward (and the backward) of every such layer, as with any collective.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        # The previous global mean: a shift shared by all ranks for the statistics (module docstring).
        # Non-persistent so that state_dict keys are those of nn.BatchNorm.
        self.register_buffer(
            "stat_shift", torch.zeros(num_features, device=device, dtype=dtype), persistent=False
        )

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input (N, C, ...) of at least 2 dims, got {input.dim()}D")

    def _synced(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and self._synced()):
            return super().forward(input)
        y, mean, var, count = _SyncBatchNormFn.apply(
            input, self.weight, self.bias, self.stat_shift, self.eps, self.process_group
        )
        with torch.no_grad():
            self.stat_shift.copy_(mean)
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                # A tensor factor for the cumulative average: float(num_batches_tracked) would wait on the host.
                f = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype) * f)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype) * f)
        return y


_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``module`` with every BatchNorm1d/2d/3d (and ``nn.SyncBatchNorm``) replaced by :class:`SyncBatchNorm`.

    The new layers hold the very same parameter and buffer tensors (an optimizer built before still points at
    them) and the same hyper-parameters, so state_dict keys and values are unchanged. Converted in place
    below the top; the return value is the module to use (a new one when ``module`` itself is a BatchNorm).
    """
    if isinstance(module, _CONVERTIBLE) and not isinstance(module, SyncBatchNorm):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError("run a forward through lazy BatchNorm layers before converting them")
        ref = module.running_mean if module.running_mean is not None else module.weight
        out = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            process_group, device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
        return out
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module
