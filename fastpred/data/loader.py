"""FFCV loaders for SSL: `TwoViewLoader` (two random resized crops per image, one JPEG decode) and
`EvalLoader` (resize + centre crop, for linear / kNN probes). FFCV is imported only when a loader is built."""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch

from fastpred.data.errors import DataError, require_ffcv

ORDERS = ("random", "quasi_random", "sequential")
#: Seconds an epoch's FFCV thread may take to stop once its batches are no longer wanted. It checks for the stop
#: every 0.5 s between batches, so this is one batch's decoding with a wide margin.
STOP_TIMEOUT_S = 30.0


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _check_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise DataError(f"not a file: {path}")
    return path


#: Files validated in this process: (device, inode, size, modification time, fields) -> number of samples.
_VALIDATED: dict[tuple, int] = {}


def check_beton(path: str | os.PathLike, fields: dict[str, str]) -> int:
    """Validate `path` before FFCV sees it (FFCV answers garbage with numpy errors or huge allocations).

    `fields` maps field name -> FFCV field class name. Returns the number of samples. Each file is validated once
    per process: the split, the loaders and the probes of a run all ask, and opening a large file's tables takes
    seconds; a file replaced or rewritten since (another inode, size or modification time) is validated again."""
    path = _check_path(path)
    key = _file_key(path, fields)
    if key not in _VALIDATED:
        _VALIDATED[key] = _validate_beton(path, fields).num_samples
    return _VALIDATED[key]


def checked_tables(path: str | os.PathLike, fields: dict[str, str]):
    """`check_beton`, returning the file's tables (`fastpred.data.beton.BetonTables`) for a caller that reads them
    (the device-resident path, the probes' labels): one read of the file, validated there if this process has not
    yet done so. The tables are not kept: at ImageNet size every rank would hold ~100 MB of them for the run."""
    from fastpred.data.beton import read_tables

    path = _check_path(path)
    key = _file_key(path, fields)
    tables = read_tables(path) if key in _VALIDATED else _validate_beton(path, fields)
    _VALIDATED[key] = tables.num_samples
    return tables


def _file_key(path: str, fields: dict[str, str]) -> tuple:
    stat = os.stat(path)
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, tuple(sorted(fields.items())))


def _validate_beton(path: str, fields: dict[str, str]):
    from fastpred.data.beton import read_tables

    tables = read_tables(path)  # numpy only: no FFCV import to check a file (nor to feed the device-resident path)
    for name, kind in fields.items():
        if name not in tables.kinds:
            raise DataError(f"field {name!r} not in {path} (it has: {', '.join(tables.kinds)})")
        if tables.kinds[name] != kind:
            raise DataError(f"field {name!r} in {path} is {tables.kinds[name]}, expected {kind}")
    if tables.num_samples == 0:
        raise DataError(f"empty dataset: {path} has no samples")
    return tables


def shard_positions(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                    shuffle: bool = True) -> np.ndarray:
    """The positions (into the n images a loader reads) that rank `rank` reads in epoch `epoch`, in order: its
    DistributedSampler-style shard. All ranks draw the same permutation (seed + epoch), pad it cyclically to a
    multiple of `world_size` so every rank has the same number of batches (DDP steps in lockstep), and take every
    `world_size`-th position. The FFCV loaders and the device-resident views (`fastpred.data.resident`) both read
    this order, so either path trains on the same batches."""
    perm = np.random.default_rng(seed + epoch).permutation(n) if shuffle else np.arange(n)
    perm = np.resize(perm, -(-n // world_size) * world_size)
    return perm[rank::world_size]


def _shard_order(rank: int, world_size: int, shuffle: bool, tag_epochs: bool = False):
    """An FFCV traversal order giving rank `rank` its shard (`shard_positions`) of the loader's indices.

    FFCV's own distributed mode reads the rank from an initialised process group; this one takes it explicitly.
    With `tag_epochs`, each index carries its epoch in the high bits (`decode.EPOCH_SHIFT`) for the seeded
    decoders. `skip` drops the first samples of the next epoch only (a run resumed mid-epoch).
    """
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        def __init__(self):  # FFCV's Loader instantiates an order by calling it with itself
            self.skip, self.keep = 0, None

        def __call__(self, loader):
            self.indices, self.seed = np.asarray(loader.indices, dtype=np.int64), loader.seed
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            order = self.indices[shard_positions(len(self.indices), self.seed, epoch, rank, world_size, shuffle)]
            if tag_epochs:
                from fastpred.data.decode import EPOCH_SHIFT

                order = order | (np.int64(epoch) << np.int64(EPOCH_SHIFT))
            stop = None if self.keep is None else self.skip + self.keep
            order, self.skip, self.keep = order[self.skip : stop], 0, None
            return order

    return ShardOrder()


def _resolve_seed(seed: int | None, world_size: int) -> int:
    if seed is not None:
        return int(seed)
    # Every rank must draw the same permutation, so a distributed run cannot seed from entropy.
    return 0 if world_size > 1 else int(np.random.randint(0, 2**31 - 1))


def _rank_world(distributed: bool, rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return rank, world_size
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DataError("distributed=True needs an initialised torch.distributed process group (or rank, world_size)")
    return dist.get_rank(), dist.get_world_size()


class _FFCVLoader:
    """Shared plumbing: validation, order, FFCV Loader construction, device transfer."""

    def __init__(self, path, batch_size, fields, decoder, *, order, drop_last, os_cache, num_workers, seed,
                 distributed, rank, world_size, device, batches_ahead, indices, label_decoder=None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if order not in ORDERS:
            raise DataError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.num_samples = check_beton(path, fields)
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.reader import Reader

        self.rank, self.world_size = _rank_world(distributed, rank, world_size)
        seed = _resolve_seed(seed, self.world_size)
        if order == "quasi_random":
            if self.world_size > 1:
                raise DataError("order='quasi_random' is not available with distributed loading; use 'random'")
            ffcv_order = OrderOption.QUASI_RANDOM
        else:
            ffcv_order = _shard_order(
                self.rank, self.world_size, shuffle=order == "random", tag_epochs=label_decoder is not None
            )
        image_field, label_field = fields
        # Fresh specs for every Loader: FFCV pops decoders out of the lists it is given. Other fields are
        # disabled (None) so that FFCV does not decode them; no ToTensor, so the whole pipeline is one JIT stage.
        pipelines = {name: None for name in Reader(os.fspath(path)).handlers}
        pipelines[image_field] = PipelineSpec(image_field, decoder=decoder)
        pipelines[label_field] = PipelineSpec(label_field, decoder=label_decoder or IntDecoder())
        if num_workers < 1:  # FFCV's own default counts every core of the machine, whoever else uses them
            from fastpred.threads import plan

            num_workers = plan(num_workers, 0).workers
        torch_threads = torch.get_num_threads()
        self._loader = Loader(
            os.fspath(path), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache, order=ffcv_order,
            seed=seed, indices=indices, pipelines=pipelines, drop_last=drop_last, batches_ahead=batches_ahead,
        )
        # FFCV sets torch's thread count to its worker count (at construction and at every epoch): a side effect
        # that oversubscribes the cores and changes float reductions. Torch's count is the caller's to set.
        torch.set_num_threads(torch_threads)
        self._names = list(self._loader.pipeline_specs)  # FFCV returns outputs in this order
        self._fields = (image_field, label_field)
        self.batch_size, self.seed = batch_size, seed
        self.device = torch.device(device) if device is not None else None
        if len(self._loader) == 0:
            raise DataError(
                f"{path} gives no batches: {len(self._loader.first_traversal_order)} images on this rank, "
                f"batch_size {batch_size}, drop_last {drop_last}"
            )

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next iteration epoch `epoch` (0-based) of this loader's seeded order, starting at batch
        `skip_batches` (a run resumed mid-epoch reads exactly the batches it had not read)."""
        self._loader.next_epoch = int(epoch)
        order = self._loader.traversal_order
        if skip_batches:
            if not hasattr(order, "skip"):
                raise DataError("resuming mid-epoch needs order='random' or 'sequential'")
            if not 0 <= skip_batches < len(self):
                raise DataError(f"cannot skip {skip_batches} of the {len(self)} batches of an epoch")
            # FFCV cuts the order at len(loader) * batch_size, then batches it: keep whole batches only.
            order.skip, order.keep = int(skip_batches) * self.batch_size, (len(self) - skip_batches) * self.batch_size

    def _batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yields (images, labels, *extra) as tensors, on `device` if given.

        On the CPU they are zero-copy views of FFCV's ring of batch buffers, valid until `batches_ahead + 2`
        further batches have been drawn (as with FFCV itself). On CUDA the copy is asynchronous from pinned
        memory; the ring slot of batch k is refilled while batch k + 1 is handed out, so before drawing the next
        batch we wait for the previous copy (long finished in practice: it precedes the step's compute).
        """
        image_field, label_field = self._fields
        cuda = self.device is not None and self.device.type == "cuda"
        pending = None
        torch_threads = torch.get_num_threads()
        it = iter(self._loader)
        torch.set_num_threads(torch_threads)  # see __init__
        try:
            while True:
                if pending is not None:
                    pending.synchronize()
                _wait_for_batch(it)
                try:
                    batch = dict(zip(self._names, next(it), strict=True))
                except StopIteration:
                    return
                images = batch[image_field]
                extra = ()
                if isinstance(images, tuple):
                    images, extra = images[0], images[1:]
                out = [torch.from_numpy(images), torch.from_numpy(batch[label_field]).view(-1)]
                out += [torch.from_numpy(e) for e in extra]
                if self.device is not None:
                    out = [t.to(self.device, non_blocking=True) for t in out]
                    if cuda:
                        pending = torch.cuda.Event()
                        pending.record()
                yield tuple(out)
        finally:  # the epoch ended, or its batches are no longer wanted (a stop, --max-steps, an error)
            _stop_epoch(it)


def _wait_for_batch(it) -> None:
    """Returns once FFCV's epoch thread has a batch (or the end) queued; raises if it died without one.

    FFCV's `__next__` waits on its queue without a timeout, so a thread that raised (its traceback is printed)
    would leave this process waiting forever. The wait wakes at each batch put, and once a second to look."""
    q = getattr(it, "output_queue", None)
    if q is None:  # not FFCV's EpochIterator: nothing to watch
        return
    with q.not_empty:
        while not q.queue and it.is_alive():
            q.not_empty.wait(1.0)
        if not q.queue:
            raise DataError("the FFCV loader's thread ended without finishing its epoch (its error is printed above)")


def _stop_epoch(it) -> None:
    """Stops an epoch's FFCV thread and waits for it, at most STOP_TIMEOUT_S; then releases its memory.

    FFCV's own close() releases the memory without waiting for the thread, which may still be decoding into it.
    The batches it queued are dropped meanwhile: its last put (the end of the epoch) has no timeout and would block
    forever on a full queue. A thread that does not stop is left to end with the process (it is a daemon), with
    one line saying so."""
    if not hasattr(it, "terminate_event"):
        return
    it.terminate_event.set()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while it.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            while True:
                it.output_queue.get_nowait()
        it.join(0.05)
    if it.is_alive():
        print(f"warning: waited {STOP_TIMEOUT_S:g} s for an FFCV loader thread to stop; left running",
              file=sys.stderr, flush=True)
        return
    if not it.closed:  # FFCV never sets it: mark it so that its __del__ does not release the memory again
        it.close()
        it.closed = True


class TwoViewLoader(_FFCVLoader):
    """Iterates `(x1, x2, y)`: two independent random resized crops (+ horizontal flips) of every image.

    x1, x2: uint8 (B, 3, H, W), channels-last strided views into one (B, 2, H, W, 3) buffer; y: int64 (B,).
    Each JPEG is decoded once and both crops are cut from the decoded image (see `fastpred.data.decode`).

    Args:
        path: .beton with an RGBImageField and an IntField (as written by `python -m fastpred.data.write`).
        batch_size: images per batch (per rank).
        resolution: output side, or (H, W).
        scale, ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
        flip_prob: probability of a horizontal flip, drawn per view.
        order: 'random' (new permutation each epoch), 'quasi_random' (FFCV's page-local shuffle, for
            process-cache reads of data sets larger than RAM; not distributed) or 'sequential'.
        drop_last: drop the final incomplete batch.
        os_cache: True reads through the OS page cache (mmap); False uses FFCV's process cache.
        num_workers: decoding threads (-1: this process's share of the cores it may use: CPU affinity and
            container quota divided by torchrun's LOCAL_WORLD_SIZE; see `fastpred.threads`). Torch's own thread
            count is left as it was (FFCV would set it to this number).
        seed: order seed, and with `os_cache` and a random or sequential order also the crops' seed: sample i's
            crops and flips in epoch e are drawn from (seed, e, i), whatever the worker count (default: random;
            0 when distributed, as every rank must agree).
        distributed: shard by the initialised torch.distributed rank and world size.
        rank, world_size: explicit shard (overrides `distributed`); shards are disjoint and cover the data
            set, padded cyclically so all ranks have the same length.
        device: move batches there (non-blocking from pinned memory on CUDA).
        return_params: also yield int32 (B, 2, 5) crop parameters (top, left, height, width, flipped).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        resolution: int | tuple[int, int] = 224,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        order: str = "random",
        drop_last: bool = True,
        os_cache: bool = True,
        num_workers: int = -1,
        seed: int | None = None,
        distributed: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device | None = None,
        batches_ahead: int = 3,
        indices: np.ndarray | None = None,
        image_field: str = "image",
        label_field: str = "label",
        return_params: bool = False,
    ):
        _check_path(path)  # before the slow FFCV import
        require_ffcv()
        from fastpred.data.decode import TaggedIntDecoder, TwoCropRGBImageDecoder

        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise DataError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]: {scale}, {ratio}")
        self.resolution = _pair(resolution)
        # Crops are seeded from (seed, epoch, sample index) through an epoch-tagged order; FFCV's process cache
        # (os_cache=False) and quasi-random order read the raw indices, so there the crops stay unseeded.
        seeded = os_cache and order != "quasi_random"
        seed = _resolve_seed(seed, _rank_world(distributed, rank, world_size)[1])
        decoder = TwoCropRGBImageDecoder(
            self.resolution, scale, ratio, flip_prob, return_params, seed=seed if seeded else None
        )
        super().__init__(
            path, batch_size, {image_field: "RGBImageField", label_field: "IntField"}, decoder,
            order=order, drop_last=drop_last, os_cache=os_cache, num_workers=num_workers, seed=seed,
            distributed=distributed, rank=rank, world_size=world_size, device=device,
            batches_ahead=batches_ahead, indices=indices, label_decoder=TaggedIntDecoder() if seeded else None,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for views, y, *extra in self._batches():  # views: (B, 2, H, W, 3)
            yield (views[:, 0].permute(0, 3, 1, 2), views[:, 1].permute(0, 3, 1, 2), y, *extra)


class EvalLoader(_FFCVLoader):
    """Iterates `(x, y)` for probes: the centre crop of side `crop_ratio * min(H, W)` resized to `resolution`
    (224 / 256 is the usual resize-256-then-crop-224). Sequential and complete (drop_last=False) by default.
    x: uint8 (B, 3, H, W), channels-last strided; y: int64 (B,). Other arguments as in `TwoViewLoader`."""

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        resolution: int = 224,
        *,
        crop_ratio: float = 224 / 256,
        order: str = "sequential",
        drop_last: bool = False,
        os_cache: bool = True,
        num_workers: int = -1,
        seed: int | None = None,
        distributed: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device | None = None,
        batches_ahead: int = 3,
        indices: np.ndarray | None = None,
        image_field: str = "image",
        label_field: str = "label",
    ):
        _check_path(path)
        require_ffcv()
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder

        if not 0 < crop_ratio <= 1:
            raise DataError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.resolution = _pair(resolution)
        decoder = CenterCropRGBImageDecoder(self.resolution, crop_ratio)
        super().__init__(
            path, batch_size, {image_field: "RGBImageField", label_field: "IntField"}, decoder,
            order=order, drop_last=drop_last, os_cache=os_cache, num_workers=num_workers, seed=seed,
            distributed=distributed, rank=rank, world_size=world_size, device=device,
            batches_ahead=batches_ahead, indices=indices,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._batches():  # x: (B, H, W, 3)
            yield x.permute(0, 3, 1, 2), y

