"""Counting the ops that make the host wait for a tensor's value (on CUDA, a synchronisation), on any device.

On the CPU nothing waits, but the same ops would on a GPU: counting them is how the CPU tests rehearse the rule
that nothing in a training step waits on the host.
"""

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostSyncCounter(TorchDispatchMode):
    """Records every op under it that makes the host wait for a tensor's value."""

    SYNCING = {
        aten._local_scalar_dense, aten.item, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
        aten.allclose, aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.repeat_interleave,
    }
    INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []
        self._paused = False

    @contextlib.contextmanager
    def paused(self):
        """Ops inside are not counted: for code whose CPU branch reads on the host by design (and whose CUDA
        branch does not, tested on CUDA)."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        packet = func.overloadpacket
        # Boolean-mask indexing needs the number of True entries, which only the host can size the output with.
        indices = args[1] if packet in self.INDEXING and len(args) > 1 else ()
        mask_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if packet in self.SYNCING or mask_index:
            self.hits.append(str(func))
        return func(*args, **kwargs)
