"""Check a .beton and time the two-view loader on it.

    python -m fastpred.data.check PATH [--batch-size 256] [--resolution 224] [--batches 20] [--workers -1]
"""

from __future__ import annotations

import argparse
import sys
import time

from fastpred.data.errors import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastpred.data.check", description=__doc__.splitlines()[0])
    p.add_argument("path", help=".beton file")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batches", type=int, default=20, help="batches to time (after one warm-up epoch start)")
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--image-field", default="image")
    p.add_argument("--label-field", default="label")
    args = p.parse_args(argv)
    try:
        from fastpred.data.loader import TwoViewLoader

        loader = TwoViewLoader(
            args.path, min(args.batch_size, 1 << 30), args.resolution, drop_last=False, num_workers=args.workers,
            image_field=args.image_field, label_field=args.label_field,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.path}: {loader.num_samples} samples, {len(loader)} batches of {args.batch_size}")
    it = iter(loader)
    next(it)  # the first batch pays for numba compilation
    t, n = time.perf_counter(), 0
    for _, (x1, _, _) in zip(range(args.batches), it, strict=False):
        n += len(x1)
    dt = time.perf_counter() - t
    if n:
        print(f"two views at {args.resolution}px: {n / dt:.0f} images/s over {n} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
