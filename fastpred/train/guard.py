"""The divergence guard: a run ends (`Diverged`, exit code 3) on non-finite parameters, on `--max-nonfinite-steps`
consecutive non-finite losses, or on a non-finite state about to be checkpointed, with one line that names the first
bad step and the last good checkpoint to continue from with a lower learning rate.

It lives at the edges of the loop, never inside the step: the run of non-finite losses is kept on the device step by
step (a few scalar kernels), and it is read with the log interval's accumulators, which the loop reads anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from fastpred.core.files import WriteError
from fastpred.train.run_dir import Diverged, RunDir


class DivergenceGuard:
    def __init__(self, run: RunDir, *, rank: int, limit: int, lr: float, device: torch.device):
        self.run, self.rank, self.limit, self.lr, self.device = run, rank, limit, lr, device
        # [consecutive non-finite losses up to the last step, this interval's count of them before it], on the
        # device; None until the loop starts.
        self.nonfinite: torch.Tensor | None = None
        self.checked_step = 0  # the step at which the model was last found finite

    def start(self) -> None:
        self.nonfinite = torch.zeros(2, device=self.device)

    def after_step(self, count: torch.Tensor) -> None:
        """After each step, on the device: the run of consecutive non-finite losses grows by one or restarts at 0.
        `count` is the interval's count of non-finite losses so far (a device scalar)."""
        g = self.nonfinite
        g[0] = (g[0] + 1) * (count - g[1])  # count - g[1]: 1 if this step's loss was non-finite, else 0
        g[1] = count

    def read_run(self, nonfinite_losses: float, world_size: int) -> int:
        """The longest run of non-finite losses over the processes, read once per log interval (and only when the
        interval had any: rare, one more collective); the interval's count starts again."""
        run = 0
        if self.nonfinite is not None:
            if nonfinite_losses:
                longest = self.nonfinite[:1].clone()
                if world_size > 1:
                    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
                run = int(longest.item())
            self.nonfinite[1] = 0
        return run

    def check(self, values: dict, step: int, last_checkpoint: tuple[int, int] | None) -> None:
        """End the run (Diverged) on non-finite parameters, or on --max-nonfinite-steps consecutive non-finite
        losses up to this log interval; both were read with the interval's accumulators."""
        run, limit = values["nonfinite_run"], self.limit
        first = step - run + 1
        if values["nonfinite_model"]:
            loss = f"; first non-finite loss at step {first}" if run else ""
            self.diverged(f"non-finite parameters at step {step} (still finite at step {self.checked_step}{loss})",
                          step, last_checkpoint)
        if limit and run >= limit:
            self.diverged(f"the loss was non-finite at {run} consecutive steps, from step {first} to step {step} "
                          f"(--max-nonfinite-steps {limit})", step, last_checkpoint)
        self.checked_step = step

    def diverged(self, reason: str, step: int, last_checkpoint: tuple[int, int] | None) -> None:
        """Record the divergence in the run folder and raise Diverged with the way to continue."""
        run = self.run.path
        if last_checkpoint is None:
            last = "no checkpoint was written before it: start again with a lower --lr (and another --out)"
        else:
            saved_step, epoch = last_checkpoint
            last = (f"last good checkpoint: {run / 'checkpoint.pt'} (epoch {epoch}, step {saved_step}); continue from "
                    f"it with a lower learning rate: python -m fastpred.train --resume {run} --lr {self.lr / 10:g}")
        if self.rank == 0:
            with contextlib.suppress(WriteError):  # a full disk must not hide the divergence
                self.run.record_event("diverged", step=step, reason=reason,
                                      checkpoint_step=None if last_checkpoint is None else last_checkpoint[0])
        raise Diverged(f"training diverged: {reason}; {last}")


def tensors_in(tree) -> Iterator[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples (a state dict, an optimizer's)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tensors_in(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from tensors_in(v)


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A bool on `device`: no floating-point element of `tensors` is NaN or infinite. One sum of |x| over all of
    them (torch's foreach norm: a few fused kernels per device and dtype, whatever their number; tensors on other
    devices, such as Adam's step counts on the CPU, are reduced where they live): NaN and inf survive a sum, and a
    finite sum overflows only at |x| ~ 3e38 / numel, itself a divergence."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.nn.utils.get_total_norm(floats, norm_type=1.0)).to(device)


def first_nonfinite(state: dict, prefix: str = "") -> str | None:
    """The key of the first tensor with a non-finite element (one host read per tensor: for the error line only)."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return name
        elif found := first_nonfinite(v, f"{name}."):
            return found
    return None
