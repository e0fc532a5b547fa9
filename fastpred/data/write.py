"""Write a .beton from an ImageFolder tree, CIFAR-10 / STL-10 folders, or the embedded digits.

    python -m fastpred.data.write SRC OUT.beton [--max-resolution 512] [--jpeg-quality 90]
        [--compress-probability 0.5] [--workers N] [--split train] [--force]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np

from fastpred.data.errors import DataError, require_ffcv
from fastpred.data.sources import open_source


class _Guarded:
    """Wraps a source so that an unreadable image is reported instead of hanging FFCV's writer.

    FFCV's writer waits for a sample counter that a crashed worker never advances, so a worker must never raise:
    the failure goes to a queue and a 1x1 placeholder is written; the whole file is then discarded.
    """

    def __init__(self, source, errors):
        self.source, self.errors = source, errors

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            image, label = self.source[i]
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
            return image, label
        except Exception as e:  # noqa: BLE001 - any failure must reach the parent, see class docstring
            name = getattr(self.source, "samples", None)
            where = name[i][0] if name else f"sample {i}"
            self.errors.put(f"cannot read {where}: {e}")
            return np.zeros((1, 1, 3), np.uint8), -1


def write_beton(
    source,
    out: str | os.PathLike,
    *,
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    workers: int = -1,
    force: bool = False,
) -> int:
    """Write `source` (indexable of `(uint8 (H, W, 3), int)`) to `out` with fields `image` and `label`.

    Images are stored as JPEG with probability `compress_probability` (1 = all JPEG, 0 = all raw), after
    shrinking so that the longer side is at most `max_resolution`. The file appears atomically. Returns N.
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(out)
    if out.exists() and not force:
        raise DataError(f"{out} exists; pass --force to overwrite")
    if not out.parent.is_dir():
        raise DataError(f"output folder does not exist: {out.parent}")
    if len(source) == 0:
        raise DataError(f"empty dataset: {getattr(source, 'name', source)} has no images")
    if not 0.0 <= compress_probability <= 1.0:
        raise DataError(f"--compress-probability must be in [0, 1], got {compress_probability}")
    if not 1 <= jpeg_quality <= 100:
        raise DataError(f"--jpeg-quality must be in [1, 100], got {jpeg_quality}")
    # 'proportion' draws per image; the pure cases use the exact modes ('smart' without a threshold stores raw).
    mode = {0.0: "raw", 1.0: "jpg"}.get(float(compress_probability), "proportion")
    fields = {
        "image": RGBImageField(
            write_mode=mode,
            max_resolution=max_resolution,
            jpeg_quality=jpeg_quality,
            compress_probability=compress_probability,
        ),
        "label": IntField(),
    }
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    workers = min(workers, len(source))
    errors = mp.get_context("fork").Queue()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(_Guarded(source, errors))
        if not errors.empty():
            raise DataError(errors.get())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(source)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastpred.data.write",
        description="Write an FFCV .beton (fields: image, label) from an image source.",
        epilog="SRC is one of: 'digits' (scikit-learn's 1797 8x8 grey digits, written as 32x32 RGB upsampled 4x "
        "nearest; splits train = 4/5, test = every 5th, all); a CIFAR-10 folder as torchvision stores it "
        "(cifar-10-batches-py or its parent; splits train, test); an STL-10 folder (stl10_binary or its parent; "
        "splits train, test, unlabeled, train+unlabeled; unlabeled images get label -1); or an ImageFolder tree "
        "SRC/<class>/<image> as ImageNet's train/ and val/ (labels in sorted class order).",
    )
    p.add_argument("src", metavar="SRC", help="digits | CIFAR-10 / STL-10 folder | ImageFolder root")
    p.add_argument("out", metavar="OUT.beton", help="output file (written to a temporary file, then renamed)")
    p.add_argument("--split", default=None, help="split for digits / CIFAR-10 / STL-10 (default: train)")
    p.add_argument("--max-resolution", type=int, default=None, help="shrink so the longer side is at most this")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality, 1..100 (default 90)")
    p.add_argument(
        "--compress-probability", type=float, default=0.5,
        help="probability that an image is stored as JPEG rather than raw pixels (default 0.5; 1 = all JPEG)",
    )
    p.add_argument("--workers", type=int, default=-1, help="writer processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = p.parse_args(argv)
    try:
        source = open_source(args.src, args.split)
        print(f"writing {len(source)} images from {getattr(source, 'name', args.src)} to {args.out}")
        write_beton(
            source, args.out, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
            compress_probability=args.compress_probability, workers=args.workers, force=args.force,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
