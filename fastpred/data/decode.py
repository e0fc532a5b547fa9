"""One JPEG decode, two random resized crops: an FFCV decoder Operation for two-view SSL.

Stock FFCV 1.0.2 can only give a second view by declaring a second `PipelineSpec` on the same field, which
decodes the JPEG again. Decoding dominates for ImageNet-sized JPEGs (a few ms against ~0.3 ms per 224 crop
resize), so decoding once into a per-thread scratch buffer and cutting both crops from it nearly halves the
work. Resizing is an area filter (OpenCV INTER_AREA, as in FFCV's own crop decoders), computed in two cheap
steps where that is faster (`halves_through_double`). This module imports FFCV at the top;
`fastpred.data.loader` imports it only when a loader is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import get_num_threads

N_PARAMS = 5  # per view: top, left, height, width (source pixels), flipped

# The two-view loader's traversal order tags each sample index with its epoch in the high bits, so that the
# decoder can seed every sample's crops from (seed, epoch, sample index): FFCV hands an operation nothing but
# the batch's indices, and numba's generators are per thread, so nothing else is the same whatever the worker
# count. Only decoders that know the tag may read a tagged order (`untag`).
EPOCH_SHIFT = 40  # sample indices below 2^40; epochs below 2^23
INDEX_MASK = (1 << EPOCH_SHIFT) - 1


def untag(sample: int) -> int:
    return sample & INDEX_MASK


def sample_seed(seed: int, sample: int) -> int:
    """A 32-bit seed for numba's generator from (loader seed, epoch, sample index), all packed in `sample`.

    splitmix64's finaliser: neighbouring indices and epochs give unrelated seeds."""
    x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(sample)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return int(x & np.uint64(0xFFFFFFFF))


def random_crop(height: int, width: int, scale: np.ndarray, log_ratio: np.ndarray) -> tuple[int, int, int, int]:
    """Inception-style crop (torchvision RandomResizedCrop.get_params semantics): (top, left, h, w)."""
    area = height * width
    for _ in range(10):
        target = area * np.random.uniform(scale[0], scale[1])
        aspect = np.exp(np.random.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return np.random.randint(0, height - h + 1), np.random.randint(0, width - w + 1), h, w
    # Fallback after 10 misses: the largest centred crop whose aspect ratio is in range.
    in_ratio = width / height
    lo, hi = np.exp(log_ratio[0]), np.exp(log_ratio[1])
    if in_ratio < lo:
        w, h = width, min(height, int(round(width / lo)))
    elif in_ratio > hi:
        h, w = height, min(width, int(round(height * hi)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def halves_through_double(h: int, w: int, out_h: int, out_w: int) -> bool:
    """Whether an (h, w) crop is area-resized to (out_h, out_w) through a (2 out_h, 2 out_w) intermediate.

    OpenCV's INTER_AREA takes a slow generic path when both axes shrink by a non-integer factor (~1 ms
    for a 400-pixel crop to 224), but its exact 2x2 halving is ~15x faster. For crops between one and two
    output sizes on both axes, area-upsampling to twice the output and halving costs ~0.4 ms and is the
    same filter up to uint8 rounding of the intermediate (mean difference ~0.2 levels of 255). Larger
    crops would need a bigger intermediate than they save, and upsampling axes are fast already.
    """
    return out_h <= h <= 2 * out_h and out_w <= w <= 2 * out_w and h * w > out_h * out_w


def hflip_(img: np.ndarray) -> None:
    """Mirror a C-contiguous (H, W, 3) uint8 image in place.

    Each row is copied out, then written back in reverse pixel order. The indices are unsigned on purpose: numba
    checks every signed index for wrap-around, and those branches keep LLVM from vectorising the loops (the
    byte-by-byte swap this replaces took 7x as long on a 224 x 224 crop). Rows are indexed in 2-D because FFCV's
    OS-cache reader marks numba's shared 1-D uint8 array type read-only (`OSCacheManager.state_type`): code
    compiled after a loader exists cannot write through a 1-D uint8 array.
    """
    zero, one, two, three = np.uintp(0), np.uintp(1), np.uintp(2), np.uintp(3)
    last = three * np.uintp(img.shape[1]) - three  # first byte of the row's last pixel
    rows = img.reshape(img.shape[0], img.shape[1] * 3)  # (H, 3W)
    row_copy = np.empty((1, rows.shape[1]), np.uint8)
    for r in range(img.shape[0]):
        for i in range(rows.shape[1]):
            row_copy[zero, i] = rows[r, i]
        for c in range(np.uintp(img.shape[1])):
            a, b = three * c, last - three * c
            rows[r, a] = row_copy[zero, b]
            rows[r, a + one] = row_copy[zero, b + one]
            rows[r, a + two] = row_copy[zero, b + two]


class TwoCropRGBImageDecoder(Operation):
    """Decodes each image of an `RGBImageField` once and emits two independent random resized crops.

    Output per batch: uint8 (B, 2, H, W, 3); with `return_params`, also int32 (B, 2, 5) holding
    (top, left, height, width, flipped) of each view in source pixels, for tests and analysis.
    Resizing is OpenCV INTER_AREA (see `halves_through_double` for the two-step case).
    """

    def __init__(
        self,
        output_size: tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        return_params: bool = False,
        seed: int | None = None,
    ):
        super().__init__()
        self.output_size = tuple(int(s) for s in output_size)
        self.scale = np.array(scale, dtype=np.float64)
        self.log_ratio = np.log(np.array(ratio, dtype=np.float64))
        self.flip_prob = float(flip_prob)
        self.return_params = return_params
        # With a seed the order is epoch-tagged (see EPOCH_SHIFT) and every sample's crops are reproducible.
        self.seed = seed

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        # Only the outputs are per sample: FFCV allocates every query for batch_size samples in each of its
        # batches_ahead + 2 slots (pinned when CUDA is present) and keeps them for the epoch. The decoded source
        # image and the double-size crop are scratch, needed only while one thread works on one sample, so they
        # are allocated per thread inside `decode_two` (see `scratch_bytes`).
        out_shape = (2, *self.output_size, 3)
        u8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
            (AllocationQuery(out_shape, u8), AllocationQuery((2, N_PARAMS), np.dtype("<i4"))),
        )

    def scratch_bytes(self) -> tuple[int, int]:
        """Bytes of (decoded source image, double-size crop) that each decoding thread allocates per batch."""
        # Python ints: max_h * max_w * 3 overflows the uint16 metadata fields.
        max_pixels = int(self.metadata["height"].max()) * int(self.metadata["width"].max())
        return 3 * max_pixels, 3 * 4 * self.output_size[0] * self.output_size[1]

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop_c = Compiler.compile(random_crop)
        hflip_c = Compiler.compile(hflip_)
        halves_c = Compiler.compile(halves_through_double)
        untag_c = Compiler.compile(untag)
        seed_c = Compiler.compile(sample_seed)
        out_h, out_w = self.output_size
        source_bytes = self.scratch_bytes()[0]
        scale, log_ratio, flip_prob = self.scale, self.log_ratio, self.flip_prob
        seeded, seed = self.seed is not None, 0 if self.seed is None else int(self.seed)

        def decode_two(batch_indices, my_storage, metadata, storage_state):
            destination, params = my_storage
            n = len(batch_indices)
            # One task per thread, each with its own scratch, taking every `tasks`-th sample: memory in use is
            # threads x scratch, not batch x slots x scratch. A sample's crops depend only on its seed, not on
            # which task decodes it.
            tasks = min(get_num_threads(), n)
            for task in my_range(tasks):
                scratch = np.empty(source_bytes, np.uint8)
                double = np.empty((2 * out_h, 2 * out_w, 3), np.uint8)
                for dst_ix in range(task, n, tasks):
                    sample = batch_indices[dst_ix]
                    if seeded:
                        np.random.seed(seed_c(seed, sample))  # this thread's generator, for this sample only
                    field = metadata[untag_c(sample)]
                    data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        imdecode_c(data, scratch, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = scratch[: 3 * height * width].reshape(height, width, 3)
                    else:
                        image = data.reshape(height, width, 3)  # raw pixels are cropped straight from the page
                    for v in range(2):
                        i, j, h, w = crop_c(height, width, scale, log_ratio)
                        if halves_c(h, w, out_h, out_w):
                            resize_crop_c(image, i, i + h, j, j + w, double)
                            resize_crop_c(double, 0, 2 * out_h, 0, 2 * out_w, destination[dst_ix, v])
                        else:
                            resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix, v])
                        flip = np.random.uniform(0.0, 1.0) < flip_prob
                        if flip:
                            hflip_c(destination[dst_ix, v])
                        p = params[dst_ix, v]
                        p[0], p[1], p[2], p[3], p[4] = i, j, h, w, flip
            return destination[:n], params[:n]

        decode_two.is_parallel = True
        if self.return_params:
            return decode_two  # the loader's graph compiles what we return
        decode_two_c = Compiler.compile(decode_two)

        def decode_views(batch_indices, my_storage, metadata, storage_state):
            return decode_two_c(batch_indices, my_storage, metadata, storage_state)[0]

        return decode_views


class TaggedIntDecoder(Operation):
    """FFCV's IntDecoder for an epoch-tagged order (see EPOCH_SHIFT): int64 (B, 1) labels."""

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        i8 = np.dtype("<i8")
        return replace(previous_state, jit_mode=True, shape=(1,), dtype=i8), AllocationQuery((1,), i8)

    def generate_code(self) -> Callable:
        untag_c = Compiler.compile(untag)

        def decode_labels(batch_indices, destination, metadata, storage_state):
            for ix in range(len(batch_indices)):
                destination[ix] = metadata[untag_c(batch_indices[ix])]
            return destination[: len(batch_indices)]

        return decode_labels
