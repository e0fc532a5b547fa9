"""Write a .beton from an ImageFolder tree, CIFAR-10 / STL-10 / MNIST-family (IDX) folders, or the embedded digits.

    python -m fastpred.data.write SRC OUT.beton [--max-resolution 500] [--jpeg-quality 90]
        [--compress-probability P] [--workers N] [--split train] [--skip-bad] [--force]

FFCV's `DatasetWriter` lays out the file (header, field descriptors, metadata, pages, allocation table), but its
worker loop is replaced here: FFCV's parent waits for a sample counter that a crashed worker never advances, its
workers share one page order that a dead worker blocks, and an image bigger than a page raises in a worker. Here
every image is checked and encoded before it takes page space, each worker reports success, a bad image or its
own failure on a queue, and the parent watches both the queue and the workers' exit codes, so any failure ends
the write with one message and no file. No wait is unbounded: a worker that encodes no image for --stall-timeout
seconds (stuck on a network file, a decoder that never returns) ends the write too, with exit code 7.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import multiprocessing as mp
import operator
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from fastpred.data.errors import DataError, require_ffcv
from fastpred.data.sources import open_source

# ffcv-imagenet's ResNet-50 recipe writes ImageNet at 500 px (longer side), 50% JPEG, quality 90: this writer's
# defaults. The shorter side of a 4:3 photo stays at 375 px, above the 224 px training crops and the 256 px
# resize of evaluation, and ImageNet's own photos are mostly at or below 500 px already.
DEFAULT_MAX_RESOLUTION = 500
DEFAULT_COMPRESS_PROBABILITY = 0.5
# Small images are stored raw unless --compress-probability is given. Measured on Fashion-MNIST at 28 px (two seeds,
# docs/benchmarks.md): all-JPEG at quality 90 costs no probe accuracy, so accuracy decides nothing; speed does. Raw
# pixels load with a copy: the two-view loader ran 2x faster on them (one thread) and the device-resident path
# read them with an eighth of the CPU time. JPEG's one gain, half the file, is worth little for sets this small
# (CIFAR-10's 50,000 images are 150 MB raw), which the resident path holds in memory anyway.
SMALL_RAW_SIDE = 64
MIN_PAGE_SIZE = 1 << 23  # FFCV's default page (8 MiB); pages grow in powers of two to hold the largest raw image
MAX_PAGE_SIZE = 1 << 32  # FFCV stores the page size as uint32
MAX_SIDE = (1 << 16) - 1  # FFCV stores heights and widths as uint16
_COMPRESS_SALT = 0x5EED  # raw or JPEG is drawn from (salt, image index): the same source gives the same file
#: Seconds the writer waits for any worker to finish an image. One image takes milliseconds (a 500 px JPEG) to
#: seconds (a 100-megapixel TIFF kept at full size); ten minutes without one is a worker stuck on a read.
DEFAULT_STALL_TIMEOUT_S = 600.0
EXIT_STALLED = 7


class Stalled(DataError):
    """No worker finished an image within the stall timeout; nothing was written."""


class _BadImage(Exception):
    """One image that cannot be written; `--skip-bad` skips it, otherwise it ends the write."""

    def __init__(self, verb: str, where: str, detail: str):
        super().__init__(f"cannot {verb} {where}: {detail}")
        self.where, self.reason = where, f"cannot {verb}: {detail}"


def _where(source, i: int) -> str:
    samples = getattr(source, "samples", None)
    return str(samples[i][0]) if samples is not None else f"sample {i} of {getattr(source, 'name', 'the source')}"


def page_size_for(max_resolution: int | None, max_pixels: int | None) -> int:
    """The page size that holds the largest image uncompressed, so that every image fits a page.

    With `max_resolution` an image is at most that many pixels on each side; without it, `max_pixels` is the
    largest H x W in the source (None: unknown, FFCV's 8 MiB, and an image that fits neither raw nor as JPEG is
    reported)."""
    largest = 3 * max_resolution**2 if max_resolution else 3 * (max_pixels or 0)
    page = MIN_PAGE_SIZE
    while page < largest:
        page *= 2
    if page >= MAX_PAGE_SIZE:
        biggest = math.isqrt(MAX_PAGE_SIZE // 2 // 3)  # the largest side whose square RGB image fits a 2 GiB page
        raise DataError(
            f"an image of {largest / 2**30:.1f} GiB uncompressed does not fit a .beton page (at most 2 GiB): "
            f"pass --max-resolution {biggest} or less"
        )
    return page


def _encode(source, i: int, max_resolution: int | None, jpeg_quality: int, compress_probability: float | None,
            page_size: int):
    """Reads image i and returns (mode, height, width, bytes to store, label); raises _BadImage."""
    from ffcv.fields.rgb_image import IMAGE_MODES, encode_jpeg, resizer

    where = _where(source, i)
    try:
        image, label = source[i]
    except Exception as e:  # noqa: BLE001 - any decoder error means "this file cannot be read"
        raise _BadImage("read", where, str(e)) from None
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise _BadImage("store", where, f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    try:
        label = operator.index(label)
    except TypeError:
        raise _BadImage("store", where, f"the label {label!r} is not an integer") from None
    image = resizer(image, max_resolution or None)  # FFCV's own INTER_AREA shrink of the longer side
    height, width = image.shape[:2]
    if max(height, width) > MAX_SIDE:
        raise _BadImage("store", where, f"{height}x{width} is above .beton's {MAX_SIDE} pixels a side; "
                                        "pass --max-resolution")
    raw_fits = image.nbytes <= page_size
    if compress_probability is None:  # the default: by size
        compress_probability = 0.0 if max(height, width) <= SMALL_RAW_SIDE else DEFAULT_COMPRESS_PROBABILITY
    draw = np.random.default_rng((_COMPRESS_SALT, i)).random()
    if draw < compress_probability or not raw_fits:
        data = encode_jpeg(image, jpeg_quality)
        if data.nbytes <= page_size:
            return IMAGE_MODES["jpg"], height, width, data, label
        if not raw_fits:
            raise _BadImage("store", where, f"{height}x{width} takes {data.nbytes} bytes even as JPEG, more than "
                                            f"a page ({page_size}); pass --max-resolution")
    return IMAGE_MODES["raw"], height, width, image.reshape(-1), label


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _start(processes: list) -> None:
    """Forks the workers with SIGINT and SIGTERM blocked. A forked child runs this process's Python handlers until
    _worker replaces them; a SIGTERM from the clean-up (another worker reported a bad image) landing in that window
    raised _Interrupted inside the child, which then unwound this process's write in the child (seen once under
    load). Blocked, the signal waits until the worker has its own handlers; here it is delivered after the forks."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        for p in processes:
            p.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker(source, tasks, results, done, metadata_sm, metadata_type, allocator, options, skip_bad):
    """One writer process: encodes the indices it is handed into its own pages of the shared file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by the parent across fork(): see _start
    try:
        metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
        image_field, label_field = metadata_type.names  # the writer's fields: image, label
        images, labels = metadata[image_field], metadata[label_field]
        skipped = []
        allocator.__enter__()
        for chunk in iter(tasks.get, None):
            for i in chunk:
                try:
                    mode, height, width, data, label = _encode(source, i, *options)
                except _BadImage as e:
                    if not skip_bad:
                        results.put(("bad", str(e)))
                        return  # the parent stops every worker; this one's pages are never written
                    skipped.append((i, e.where, e.reason))
                else:
                    allocator.set_current_sample(i)
                    images["data_ptr"][i], storage = allocator.malloc(data.nbytes)
                    storage[:] = data
                    images["mode"][i], images["height"][i], images["width"][i] = mode, height, width
                    labels[i] = label
                with done.get_lock():  # per image, skipped ones too: the parent's stall bound is one image's time
                    done.value += 1
        allocator.__exit__(None, None, None)  # writes this worker's last page, in page order
        del metadata, images, labels
        results.put(("done", allocator.allocations, skipped))
    except BaseException as e:  # noqa: BLE001 - whatever happens must reach the parent, which then stops
        results.put(("failed", f"{type(e).__name__}: {e}"))
        sys.exit(1)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _write_pages(source, tmp: Path, page_size: int, workers: int, options: tuple, skip_bad: bool,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT_S):
    """Writes every image of `source` to `tmp` with `workers` processes.

    Returns the number of images written and the skipped ones as (index, where, why). Raises DataError on a bad
    image (without `skip_bad`) or a failed worker, Stalled when no image was finished (skipped images count) for
    `stall_timeout` seconds, KeyboardInterrupt on Ctrl-C; `tmp` is then incomplete."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    n = len(source)
    writer = DatasetWriter(str(tmp), {"image": RGBImageField(), "label": IntField()}, page_size, workers)
    writer.num_samples = n
    ctx = mp.get_context("fork")  # workers inherit the source (an ImageNet file list) instead of pickling it
    processes, tasks, progress = [], ctx.Queue(), _Progress(n)
    try:
        writer.prepare()  # header and field descriptors on disk, the metadata table in shared memory
        results, done = ctx.Queue(), ctx.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(str(tmp), writer.data_region_start, page_size)
        chunk = max(1, min(100, n // (8 * workers)))
        for start in range(0, n, chunk):
            tasks.put(range(start, min(n, start + chunk)))
        for _ in range(workers):
            tasks.put(None)
        args = (source, tasks, results, done, writer.metadata_sm, writer.metadata_type, allocator, options, skip_bad)
        processes = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(workers)]
        _start(processes)
        allocations, skipped, finished = [], [], 0
        last_done, last_change = -1, time.monotonic()
        while finished < workers:
            try:
                message = results.get(timeout=0.2)
            except queue.Empty:
                progress.update(done.value)
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise DataError(f"a writer process died ({_describe_exit(dead[0])}); nothing written") from None
                if done.value != last_done:
                    last_done, last_change = done.value, time.monotonic()
                elif time.monotonic() - last_change > stall_timeout:
                    stuck = sum(p.is_alive() for p in processes) - finished
                    raise Stalled(f"waited {stall_timeout:g} s for the writer processes to finish an image "
                                  f"({done.value} of {n} done, {stuck} still at work): one is stuck; nothing "
                                  "written (--stall-timeout)") from None
                continue
            if message[0] == "bad":
                raise DataError(message[1])
            if message[0] == "failed":
                raise DataError(f"a writer process failed: {message[1]}; nothing written")
            allocations += message[1]
            skipped += message[2]
            finished += 1
        progress.update(n)
        for p in processes:  # every page is on disk once a worker reports done; `finally` ends a worker that hangs
            p.join(timeout=min(10.0, stall_timeout))
        kept = n - len(skipped)
        if kept == 0:
            _, where, why = min(skipped)
            raise DataError(f"none of the {n} images could be written; the first, {where}: {why}")
        if skipped:
            allocations = _drop_samples(writer, sorted(i for i, _, _ in skipped), allocations)
        writer.finalize(allocations)  # metadata table, allocation table, then the header
        return kept, sorted(skipped)
    finally:
        progress.close()
        tasks.cancel_join_thread()  # chunks left in the queue must not hold this process at exit
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        metadata_sm = getattr(writer, "metadata_sm", None)
        if hasattr(metadata_sm, "unlink"):  # prepare() got as far as creating it
            metadata_sm.close()
            metadata_sm.unlink()


def _drop_samples(writer, skipped: list[int], allocations: list) -> list:
    """Removes skipped samples from the metadata table, renumbering the others in order (labels stay with their
    images); their pages hold nothing of the skipped ones, which were never allocated."""
    n = writer.num_samples
    keep = np.ones(n, dtype=bool)
    keep[skipped] = False
    new_index = np.cumsum(keep) - 1
    metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
    metadata[: int(keep.sum())] = metadata[keep]  # the tail is left over and ignored: num_samples says where to stop
    del metadata  # the shared memory cannot close while a view of it exists
    writer.header["num_samples"] = int(keep.sum())
    return [(int(new_index[sample]), ptr, size) for sample, ptr, size in allocations]


class _Progress:
    """A progress bar on a terminal; nothing otherwise (a log or a test reads one line per outcome)."""

    def __init__(self, n: int):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=n, unit="img", file=sys.stderr)

    def update(self, value: int) -> None:
        if self.bar is not None:
            self.bar.update(value - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_beton(
    source,
    out: str | os.PathLike,
    *,
    max_resolution: int | None = DEFAULT_MAX_RESOLUTION,
    jpeg_quality: int = 90,
    compress_probability: float | None = None,
    workers: int = -1,
    force: bool = False,
    skip_bad: bool = False,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
) -> int:
    """Write `source` (indexable of `(uint8 (H, W, 3), int)`) to `out` with fields `image` and `label`.

    Images are shrunk so that the longer side is at most `max_resolution` (None or 0: kept as they are), then
    stored as JPEG with probability `compress_probability` (drawn per image index, so the same source gives the
    same choices), as raw pixels otherwise. By default (None) an image whose longer side is at most SMALL_RAW_SIDE
    (64) pixels is stored raw and a larger one as JPEG with probability 0.5. Pages are sized so that every image
    fits raw; a JPEG larger than its raw pixels is stored raw. The file appears atomically, or not at all. With
    `skip_bad`, images that cannot be read are left out and listed, with the reason, in `OUT.skipped.txt`;
    otherwise the first one is a DataError. A write in which no worker finishes an image for `stall_timeout`
    seconds ends with Stalled (a DataError), nothing written. Returns the number of images written.
    """
    require_ffcv()
    out = Path(out)
    if out.is_dir():
        raise DataError(f"{out} is a folder; name the .beton file to write")
    if out.exists() and not force:
        raise DataError(f"{out} exists; pass --force to overwrite")
    if not out.parent.is_dir():
        raise DataError(f"output folder does not exist: {out.parent}")
    if len(source) == 0:
        raise DataError(f"empty dataset: {getattr(source, 'name', source)} has no images")
    if compress_probability is not None and not 0.0 <= compress_probability <= 1.0:
        raise DataError(f"--compress-probability must be in [0, 1], got {compress_probability}")
    if not 1 <= jpeg_quality <= 100:
        raise DataError(f"--jpeg-quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 0:
        raise DataError(f"--max-resolution must be >= 0 (0: keep the original size), got {max_resolution}")
    if not stall_timeout > 0:
        raise DataError(f"--stall-timeout must be > 0 seconds, got {stall_timeout}")
    max_pixels = None
    if not max_resolution and hasattr(source, "max_pixels"):
        max_pixels = source.max_pixels()  # ImageFolder: one header read per file
    page_size = page_size_for(max_resolution, max_pixels)
    workers = min(workers if workers > 0 else (os.cpu_count() or 1), len(source))
    options = (max_resolution or None, jpeg_quality, compress_probability, page_size)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    skipped_list = out.with_name(out.name + ".skipped.txt")
    tmp_list = skipped_list.with_name(f".{skipped_list.name}.tmp{os.getpid()}")
    try:
        kept, skipped = _write_pages(source, tmp, page_size, workers, options, skip_bad, stall_timeout)
        if skipped:
            tmp_list.write_text("".join(f"{where}\t{why}\n" for _, where, why in skipped))
        os.replace(tmp, out)
        if skipped:
            os.replace(tmp_list, skipped_list)
        elif skipped_list.exists():
            skipped_list.unlink()  # it listed the skipped images of the file just replaced
    except OSError as e:
        raise DataError(f"cannot write {out}: {e}") from None
    finally:
        for leftover in (tmp, tmp_list):
            if leftover.exists():
                leftover.unlink()
    return kept


class _Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum, frame):
    # The first SIGINT / SIGTERM unwinds the write (workers stopped, temporary files removed); further ones are
    # ignored so that they cannot interrupt that clean-up halfway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Interrupted(signum)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastpred.data.write",
        description="Write an FFCV .beton (fields: image, label) from an image source.",
        epilog="SRC is one of: 'digits' (scikit-learn's 1797 8x8 grey digits, written as 32x32 RGB upsampled 4x "
        "nearest; splits train = 4/5, test = every 5th, all); a CIFAR-10 folder as torchvision stores it "
        "(cifar-10-batches-py or its parent; splits train, test; read without running any code the batches may "
        "hold); an STL-10 folder (stl10_binary or its parent; splits train, test, unlabeled, train+unlabeled; "
        "unlabeled images get label -1); a folder of the MNIST family's IDX files (MNIST, Fashion-MNIST, KMNIST: "
        "train-images-idx3-ubyte[.gz], t10k-..., or the train-images.idx3-ubyte spelling; splits train, test; grey "
        "images stored as three equal channels); or an ImageFolder tree SRC/<class>/<image> as ImageNet's train/ "
        "and val/ (labels in sorted class order).",
    )
    p.add_argument("src", metavar="SRC", help="digits | CIFAR-10 / STL-10 / IDX folder | ImageFolder root")
    p.add_argument("out", metavar="OUT.beton", help="output file (written to a temporary file, then renamed)")
    p.add_argument("--split", default=None, help="split for digits / CIFAR-10 / STL-10 / IDX (default: train)")
    p.add_argument(
        "--max-resolution", type=int, default=DEFAULT_MAX_RESOLUTION,
        help=f"shrink so the longer side is at most this (default {DEFAULT_MAX_RESOLUTION}, ffcv-imagenet's "
        "ResNet-50 setting; 0 keeps every image at its size, and pages and the loader's buffers grow to the largest)",
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality, 1..100 (default 90)")
    p.add_argument(
        "--compress-probability", type=float, default=None,
        help=f"probability that an image is stored as JPEG rather than raw pixels (1 = all JPEG; default: raw for "
        f"images of at most {SMALL_RAW_SIDE} px a side, {DEFAULT_COMPRESS_PROBABILITY} for larger ones)",
    )
    p.add_argument("--workers", type=int, default=-1, help="writer processes (default: all cores)")
    p.add_argument(
        "--skip-bad", action="store_true",
        help="leave out images that cannot be read or stored, listing each with its reason in OUT.skipped.txt "
        "(default: the first one is an error and nothing is written)",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S,
                   help=f"seconds without a finished image before the write is given up, exit {EXIT_STALLED} "
                   f"(default {DEFAULT_STALL_TIMEOUT_S:g})")
    args = p.parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if on_main_thread else {}
    out_before = _identity(args.out)
    try:
        start = time.perf_counter()
        source = open_source(args.src, args.split)
        print(f"writing {len(source)} images from {getattr(source, 'name', args.src)} to {args.out}", flush=True)
        kept = write_beton(
            source, args.out, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
            compress_probability=args.compress_probability, workers=args.workers, force=args.force,
            skip_bad=args.skip_bad, stall_timeout=args.stall_timeout,
        )
        size = os.path.getsize(args.out)
        print(f"wrote {kept} images to {args.out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
        if args.skip_bad:
            listed = f": see {args.out}.skipped.txt" if kept < len(source) else ""
            print(f"skipped {len(source) - kept} images that could not be read or stored{listed}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STALLED if isinstance(e, Stalled) else 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        # Only a signal in the last microseconds, between the rename and here, finds the new file in place.
        written = _identity(args.out) not in (None, out_before)
        outcome = f"{args.out} was written" if written else "nothing written"
        print(f"error: interrupted ({signal.Signals(signum).name}); {outcome}", file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
