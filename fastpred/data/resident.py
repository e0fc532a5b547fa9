"""Device-resident two-view data for sets that fit in memory: the uint8 images as one (N, 3, H, W) tensor on the
training device, and both views of every image cut there, batched, with no decode and no loader thread.

On small sets (the MNIST family at 28 px, CIFAR at 32, STL-10 at 96) FFCV's per-sample decode and its thread are
pure overhead next to a step that could use every core. Here the images are read once from the .beton (raw pixels
copied from the file at the pointers of its metadata table, read with numpy by `fastpred.data.beton`, JPEGs
decoded once with OpenCV) and each batch is:

    positions (the loader's shard order) -> gather (B, 3, H, W) -> float -> per-view random resized crop + flip
    (one grid_sample over both views) -> round -> uint8 x1, x2 (B, 3, r, r)

Why `grid_sample` (bilinear, on a sampling grid built per view, both views of an image in one (2r, r) grid) and not
`torchvision.ops.roi_align`: on the 2-core CPU (torch 2.14.1, one thread) it cut two views of 256 images in 6.2 ms
at 28 px against 13.8 ms, 13.4 against 30.3 ms at 32 px and 69 against 122 ms at 96 px (batch 128), with the same
values (both are bilinear when a crop is enlarged, which is every crop when the resolution is the image's side).
When the image is larger than the views (the digits preset: 32 px images, 16 px views), plain bilinear would
alias: each output pixel then averages an s x s grid of bilinear samples, s = ceil(image side / view side), as
roi_align's adaptive sampling does (mean difference to OpenCV's area resize of the same box, which the FFCV
decoder uses: 1.38 levels of 255 against roi_align's 1.29 and plain bilinear's 3.77).

The order is the FFCV loader's (`fastpred.data.loader.shard_positions`: the same permutation per (seed, epoch),
the same rank shards, drop_last), so either path trains on the same images in the same batches; crop parameters
follow torchvision's RandomResizedCrop distribution and come from a generator seeded per (seed, rank, epoch,
batch), so a run resumed mid-epoch reads exactly the batches an uninterrupted one would. The crops' values differ
from the FFCV decoder's (other random draws, bilinear instead of area resize): switching path changes a run's
trajectory, not its distribution.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as nnf

from fastpred.data.errors import DataError

#: Default budget on CUDA: this fraction of the device's memory (per process: under DDP every rank holds the set).
CUDA_FRACTION = 0.25
#: Default budget on the CPU, in MiB: every MNIST-like set, CIFAR-10/100 and STL-10's train split fit; STL-10 with
#: its unlabeled split (2,768 MiB) stays on FFCV, which reads through the shared, evictable page cache.
CPU_CAP_MIB = 2048
MODES = ("auto", "on", "off")
_MIB = 2**20
_RAW = 1  # FFCV's IMAGE_MODES["raw"] (0 is "jpg"); RGBImageField's metadata holds it per image


def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """A generator seed per (seed, rank, epoch, batch): a batch's random draws do not depend on where a run was
    resumed. Tuples of ints hash the same in every process (PYTHONHASHSEED salts only str and bytes)."""
    return hash((seed, rank, epoch, batch)) & 0x7FFF_FFFF_FFFF_FFFF


# --- reading the set ---------------------------------------------------------------------------------------------
class MixedSizes(DataError):
    """The images of a set are not all one size: they cannot be one (N, 3, H, W) tensor."""


class SetShape(NamedTuple):
    """What the resident set would hold: images, their common size and the bytes of the uint8 tensor."""

    count: int
    height: int
    width: int

    @property
    def nbytes(self) -> int:
        return self.count * 3 * self.height * self.width


def _reader(path: str | os.PathLike, image_field: str, label_field: str):
    from fastpred.data.loader import checked_tables

    # The tables alone, read with numpy: FFCV is not imported on this path.
    tables = checked_tables(path, {image_field: "RGBImageField", label_field: "IntField"})
    return tables, tables.column(image_field), tables.column(label_field)


def _rows(reader, indices: np.ndarray | None) -> np.ndarray:
    n = int(reader.num_samples)
    if indices is None:
        return np.arange(n)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise DataError(f"indices outside 0..{n - 1} of {reader.path}")
    return indices


def set_shape(path: str | os.PathLike, indices: np.ndarray | None = None, *, image_field: str = "image",
              label_field: str = "label") -> SetShape:
    """The size of the images `indices` (default: all) of a .beton, from its metadata (no pixel is read).

    Raises MixedSizes when they are not all one size: the resident path needs one (N, 3, H, W) tensor."""
    reader, image_col, _ = _reader(path, image_field, label_field)
    return _shape(reader, reader.metadata[image_col][_rows(reader, indices)])


def _shape(reader, meta: np.ndarray) -> SetShape:
    sizes = np.unique(np.stack([meta["height"], meta["width"]], 1), axis=0)
    if len(sizes) != 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        raise MixedSizes(f"{reader.path} holds images of {len(sizes)} sizes ({shown}); the device-resident "
                         "path needs one size (write the .beton at one size, or use --resident off)")
    return SetShape(len(meta), int(sizes[0][0]), int(sizes[0][1]))


def read_set(path: str | os.PathLike, indices: np.ndarray | None = None, *, device: str | torch.device = "cpu",
             image_field: str = "image", label_field: str = "label",
             chunk_bytes: int = 64 * _MIB) -> tuple[torch.Tensor, torch.Tensor]:
    """The images `indices` (default: all) of a .beton as uint8 (N, 3, H, W) and their labels int64 (N,), on
    `device`, without FFCV: raw images are copied from the bytes the metadata table's pointers give, JPEGs are
    decoded once with OpenCV. The host holds one chunk of `chunk_bytes` at a time, not the set: under DDP every
    process on a node reads the whole set for its own GPU."""
    reader, image_col, label_col = _reader(path, image_field, label_field)
    rows = _rows(reader, indices)
    meta = reader.metadata[image_col][rows]
    shape = _shape(reader, meta)
    device = torch.device(device)
    labels = torch.from_numpy(np.asarray(reader.metadata[label_col][rows], dtype=np.int64)).to(device)
    h, w = shape.height, shape.width
    nbytes = 3 * h * w
    images = torch.empty((len(rows), 3, h, w), dtype=torch.uint8, device=device)
    data = np.memmap(os.fspath(path), np.uint8, mode="r")
    # The allocation table gives each pointer's size (a JPEG's length); sorted for a binary search, as FFCV does.
    order = np.argsort(reader.alloc_table["ptr"])
    ptrs, sizes = reader.alloc_table["ptr"][order], reader.alloc_table["size"][order]
    modes, starts = meta["mode"].tolist(), meta["data_ptr"].tolist()
    per_chunk = max(1, chunk_bytes // nbytes)
    chunk = np.empty((min(per_chunk, len(rows)), h, w, 3), np.uint8)  # the stored layout (HWC)
    for first in range(0, len(rows), per_chunk):
        n = min(per_chunk, len(rows) - first)
        flat = chunk[:n].reshape(n, nbytes)
        for k in range(n):
            ptr = starts[first + k]
            if modes[first + k] == _RAW:
                if ptr + nbytes > len(data):
                    raise DataError(f"corrupt .beton {path}: an image's bytes are outside the file")
                flat[k] = data[ptr:ptr + nbytes]
            else:
                chunk[k] = _decode_jpeg(data, ptr, ptrs, sizes, (h, w), path)
        images[first:first + n] = torch.from_numpy(chunk[:n]).to(device).permute(0, 3, 1, 2)
    return images, labels


def _decode_jpeg(data: np.ndarray, ptr: int, ptrs: np.ndarray, sizes: np.ndarray, hw: tuple[int, int],
                 path) -> np.ndarray:
    import cv2

    at = int(np.searchsorted(ptrs, ptr))
    if at >= len(ptrs) or int(ptrs[at]) != ptr or ptr + int(sizes[at]) > len(data):
        raise DataError(f"corrupt .beton {path}: an image's pointer is not in its allocation table")
    bgr = cv2.imdecode(np.asarray(data[ptr:ptr + int(sizes[at])]), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != hw:
        raise DataError(f"corrupt .beton {path}: a JPEG that does not decode to its recorded {hw[0]}x{hw[1]}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --- choosing the path -------------------------------------------------------------------------------------------
def budget_mib(device: torch.device, max_mib: float = 0) -> float:
    """The memory the resident set may take: `max_mib` if > 0, else CUDA_FRACTION of the GPU's memory on CUDA and
    CPU_CAP_MIB on the CPU."""
    if max_mib > 0:
        return float(max_mib)
    if device.type == "cuda":
        return CUDA_FRACTION * torch.cuda.get_device_properties(device).total_memory / _MIB
    return float(CPU_CAP_MIB)


class PathChoice(NamedTuple):
    resident: bool
    note: str  # one line: which path and why


def choose_path(mode: str, path: str | os.PathLike, indices: np.ndarray | None, device: torch.device,
                max_mib: float = 0, *, image_field: str = "image", label_field: str = "label") -> PathChoice:
    """Whether a run's training views are device-resident: always with `on` (DataError when the set has mixed sizes
    or exceeds the budget), never with `off`, and with `auto` when one size and within the budget."""
    if mode not in MODES:
        raise DataError(f"resident must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return PathChoice(False, "FFCV loader (--resident off)")
    try:
        shape = set_shape(path, indices, image_field=image_field, label_field=label_field)
    except MixedSizes as e:
        if mode == "on":
            raise MixedSizes(f"--resident on: {e}") from None
        return PathChoice(False, "FFCV loader: the images are not all one size (--resident auto)")
    budget, need = budget_mib(device, max_mib), shape.nbytes / _MIB
    where = f"{shape.count} images of {shape.height}x{shape.width}, {need:.1f} MiB on {device}"
    if need > budget:
        if mode == "on":
            raise DataError(f"--resident on: the training images take {need:.1f} MiB on {device}, over the budget "
                            f"of {budget:.0f} MiB (raise --resident-max-mb, or use --resident off)")
        return PathChoice(False, f"FFCV loader: {where} exceed the budget of {budget:.0f} MiB (--resident auto)")
    return PathChoice(True, f"device-resident: {where} (budget {budget:.0f} MiB; --resident {mode})")


# --- crops on the device -----------------------------------------------------------------------------------------
def _fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """RandomResizedCrop's crop after ten misses: the largest centred one with its aspect ratio in range."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return min(height, round(width / ratio[0])), width
    if in_ratio > ratio[1]:
        return height, min(width, round(height * ratio[1]))
    return height, width


def crop_params(n: int, height: int, width: int, *, scale: tuple[float, float], ratio: tuple[float, float],
                flip_prob: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n crops of an (height, width) image: float32 (n, 5) (top, left, height, width, flipped) in source pixels.

    torchvision's RandomResizedCrop.get_params, vectorised: ten tries of area ~ U(scale) x image area and aspect
    ratio ~ exp(U(log ratio)), rounded sides; the first that fits wins, else the centred fallback crop; the corner
    is uniform over the positions that fit."""
    tries = torch.rand(n, 10, 2, generator=generator, device=device)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    any_fits = fits.any(dim=1)
    fb_h, fb_w = _fallback(height, width, ratio)
    h = torch.where(any_fits, h.gather(1, first)[:, 0], fb_h)
    w = torch.where(any_fits, w.gather(1, first)[:, 0], fb_w)
    corner = torch.rand(n, 2, generator=generator, device=device)
    # floor(U x positions) is uniform over 0..positions-1; the min guards float32 rounding up at U close to 1.
    top = torch.where(any_fits, torch.minimum(torch.floor(corner[:, 0] * (height - h + 1)), height - h),
                      float((height - fb_h) // 2))
    left = torch.where(any_fits, torch.minimum(torch.floor(corner[:, 1] * (width - w + 1)), width - w),
                       float((width - fb_w) // 2))
    flip = torch.rand(n, generator=generator, device=device) < flip_prob
    return torch.stack([top, left, h, w, flip.float()], dim=1)


def resized_crops(images: torch.Tensor, params: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Views of `images`, bilinear, rounded to uint8: images (B, 3, H, W) any dtype, params float (V * B, 5) from
    `crop_params` (view v of image b at row v * B + b) -> uint8 (B, 3, V * size[0], size[1]), the views stacked
    along the height (one grid_sample for all; view v is rows v * size[0] .. (v + 1) * size[0]).

    A crop's box [left, left + width) x [top, top + height) in continuous pixel coordinates is sampled at the output
    pixels' centres (align_corners=False: the full box at its own size reproduces the image). Where an image side
    exceeds its view side, every output pixel averages s x s bilinear samples (s = ceil(side ratio)), so that
    shrinking does not alias."""
    b, _, height, width = images.shape
    views = params.shape[0] // b
    (rh, rw), (sy, sx) = size, (max(1, -(-height // size[0])), max(1, -(-width // size[1])))
    ny, nx = rh * sy, rw * sx
    top, left, h, w, flip = params.to(torch.float32).unbind(1)  # each (V * B,)
    ky = (torch.arange(ny, device=images.device, dtype=torch.float32) + 0.5) / ny  # sample centres in [0, 1]
    kx = (torch.arange(nx, device=images.device, dtype=torch.float32) + 0.5) / nx
    x0 = torch.where(flip > 0, left + w, left)  # a flipped view reads its box right to left
    dx = torch.where(flip > 0, -w, w)
    gx = (x0[:, None] + kx * dx[:, None]) * (2 / width) - 1  # (V * B, nx), grid_sample's [-1, 1]
    gy = (top[:, None] + ky * h[:, None]) * (2 / height) - 1  # (V * B, ny)
    gx = gx.view(views, b, 1, nx).transpose(0, 1).expand(b, views, ny, nx)
    gy = gy.view(views, b, ny, 1).transpose(0, 1).expand(b, views, ny, nx)
    grid = torch.stack([gx, gy], dim=-1).reshape(b, views * ny, nx, 2)
    out = nnf.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if sy > 1 or sx > 1:
        out = nnf.avg_pool2d(out, (sy, sx))
    return out.round_().clamp_(0, 255).to(torch.uint8)


# --- the views ---------------------------------------------------------------------------------------------------
class ResidentViews:
    """Iterates `(x1, x2, y)` like `fastpred.data.loader.TwoViewLoader`, from a set held on the device.

    x1, x2: uint8 (B, 3, r, r) on the device (views into one (B, 3, 2r, r) tensor); y: int64 (B,). Batches,
    order, rank shards and drop_last are the loader's (`shard_positions`); crops follow torchvision's
    RandomResizedCrop (`crop_params`) and are cut on the device (`resized_crops`); batch b of epoch e draws them
    from a generator seeded with (seed, rank, e, b).

    Args:
        images: uint8 (N, 3, H, W), the set this process trains on (moved to `device` once).
        labels: int64 (N,).
        batch_size, resolution, scale, ratio, flip_prob, seed, rank, world_size: as in `TwoViewLoader`; the
            positions of the order index `images` (a loader's `indices` are already applied).
        return_params: also yield int32 (B, 2, 5) crop parameters (top, left, height, width, flipped).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        resolution: int | tuple[int, int],
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        return_params: bool = False,
        name: str = "the resident set",
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(labels) != len(images):
            raise DataError(f"need uint8 (N, 3, H, W) images and N labels, got {tuple(images.shape)} "
                            f"{images.dtype} and {len(labels)} labels")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise DataError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]: {scale}, {ratio}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(device=self.device, dtype=torch.int64)
        self.num_samples = len(images)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, int(seed), rank, world_size
        self.resolution = (int(resolution), int(resolution)) if isinstance(resolution, int) else tuple(resolution)
        self.scale, self.ratio, self.flip_prob, self.return_params = scale, ratio, flip_prob, return_params
        self._epoch, self._skip = 0, 0
        if len(self) == 0:
            raise DataError(f"{name} gives no batches: {-(-len(images) // world_size)} images on this rank, "
                            f"batch_size {batch_size}, drop_last True")

    @classmethod
    def from_beton(cls, path: str | os.PathLike, batch_size: int, resolution: int | tuple[int, int], *,
                   indices: np.ndarray | None = None, image_field: str = "image", label_field: str = "label",
                   **kwargs) -> ResidentViews:
        """The images `indices` (default: all) of a .beton (`read_set`), held on `device`."""
        images, labels = read_set(path, indices, device=kwargs.get("device", "cpu"), image_field=image_field,
                                  label_field=label_field)
        return cls(images, labels, batch_size, resolution, name=os.fspath(path), **kwargs)

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size) // self.batch_size  # drop_last, as the loader

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next iteration epoch `epoch` (0-based), starting at batch `skip_batches`."""
        if not 0 <= skip_batches < len(self):
            raise DataError(f"cannot skip {skip_batches} of the {len(self)} batches of an epoch")
        self._epoch, self._skip = int(epoch), int(skip_batches)

    def positions(self, epoch: int) -> np.ndarray:
        """This rank's positions into `images` for epoch `epoch`, whole batches only."""
        from fastpred.data.loader import shard_positions

        order = shard_positions(self.num_samples, self.seed, epoch, self.rank, self.world_size)
        return order[: len(self) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, skip = self._epoch, self._skip
        self._epoch, self._skip = epoch + 1, 0
        order = torch.from_numpy(self.positions(epoch)).to(self.device)  # one copy per epoch
        g = torch.Generator(self.device)
        bs, (height, width), rh = self.batch_size, self.images.shape[2:], self.resolution[0]
        for b in range(skip, len(self)):
            g.manual_seed(batch_seed(self.seed, self.rank, epoch, b))  # host-side: no device sync
            pos = order[b * bs:(b + 1) * bs]
            params = crop_params(2 * bs, height, width, scale=self.scale, ratio=self.ratio,
                                 flip_prob=self.flip_prob, generator=g, device=self.device)
            views = resized_crops(self.images[pos], params, self.resolution)  # (B, 3, 2r, r)
            out = (views[:, :, :rh], views[:, :, rh:], self.labels[pos])
            if self.return_params:
                out += (params.view(2, bs, 5).transpose(0, 1).to(torch.int32),)
            yield out
