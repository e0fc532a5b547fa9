"""Two views of Fashion-MNIST's 60,000 training images at 28 px, batch 256: how fast each way of loading them goes.

    python -m bench.loaders_fmnist [--threads 1 2] [--device cpu] [--beton TRAIN.beton]

prints a markdown table, one row per loader and thread count: images/s over one full epoch (234 batches, 59,904
images) after one warm-up epoch (FFCV compiles its pipeline with numba during its first epoch), and the seconds
each took to set up (the resident path: reading the whole set, decoding any JPEG once). The loaders, all
with the fashion-mnist preset's crops (random resized crop, scale 0.2 to 1, aspect 3/4 to 4/3, p = 0.5 flip):

- fastpred_loader: `fastpred.data.TwoViewLoader` on the cached raw .beton, two views per decoded image, N FFCV
  threads.
- ffcv_one_view: stock FFCV on the same .beton, one view per image (its RandomResizedCropRGBImageDecoder,
  RandomHorizontalFlip, ToTensor, ToTorchImage), N threads: half the views of the others.
- torchvision: the IDX images in memory as a torch Dataset, two views per image drawn per sample by
  torchvision.transforms.v2 (RandomResizedCrop with antialias, RandomHorizontalFlip) on the one grey channel,
  then repeated to three (what the other paths deliver), a DataLoader with N worker processes.
- fastpred_resident: `fastpred.data.resident.ResidentViews`, the path the fashion-mnist preset trains from: the
  set held as one uint8 tensor, both views of a batch cut at once, N torch threads, no loader thread.

`--beton` gives the FFCV and resident paths another file of the same images (one written with
`--compress-probability 1`: the cost of JPEG storage). The same rows as `pytest bench/test_data_pipeline.py -k
fmnist` (pytest-benchmark). Needs dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch

BATCH, RES = 256, 28
SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)  # the fashion-mnist preset's crop_scale
IMPLS = ("fastpred_loader", "ffcv_one_view", "torchvision", "fastpred_resident")
VIEWS = {"ffcv_one_view": 1}  # views per image; the others make two
TRAIN_BETON: str | None = None  # --beton: read instead of the cached raw training .beton


def betons() -> tuple[str, str]:
    """The cached train and test .beton of Fashion-MNIST (written on first use), or a DataError naming the package."""
    from fastpred.data.named import named_betons

    train, test = named_betons("fashion-mnist")
    return TRAIN_BETON or str(train), str(test)


def fastpred_loader(threads: int, device: str = "cpu") -> Callable[[], int]:
    from fastpred.data import TwoViewLoader

    loader = TwoViewLoader(betons()[0], BATCH, RES, scale=SCALE, ratio=RATIO, num_workers=threads, seed=0,
                           device=device if device != "cpu" else None)
    return lambda: _count(loader, device)


def ffcv_one_view(threads: int, device: str = "cpu") -> Callable[[], int]:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    loader = Loader(betons()[0], batch_size=BATCH, num_workers=threads, order=OrderOption.RANDOM, seed=0,
                    drop_last=True, pipelines={
                        "image": [RandomResizedCropRGBImageDecoder((RES, RES), scale=SCALE, ratio=RATIO),
                                  RandomHorizontalFlip(), ToTensor(), ToTorchImage()],
                        "label": [IntDecoder(), ToTensor()]})
    return lambda: sum(len(x) for x, _ in loader)


class _GreyTwoViews(torch.utils.data.Dataset):
    """The IDX images in memory, (N, 28, 28) uint8; item i is two independently cropped and flipped (3, 28, 28)
    views and the label. Cropped as one grey channel, then repeated: three equal channels cost a third."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from torchvision.transforms import v2

        self.images, self.labels = torch.tensor(images), torch.tensor(labels, dtype=torch.int64)  # writable copies
        self.t = v2.Compose([v2.RandomResizedCrop(RES, scale=SCALE, ratio=RATIO, antialias=True),
                             v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        grey = self.images[i].unsqueeze(0)  # (1, 28, 28)
        return self.t(grey).expand(3, -1, -1), self.t(grey).expand(3, -1, -1), self.labels[i]


def torchvision(threads: int, device: str = "cpu") -> Callable[[], int]:
    from fastpred.data.idx import idx_files, read_idx
    from fastpred.data.named import NAMED_SOURCES

    images_path, labels_path = idx_files(NAMED_SOURCES["fashion-mnist"].folder(), "train")
    ds = _GreyTwoViews(read_idx(images_path, 3), read_idx(labels_path, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=threads, drop_last=True,
                                         persistent_workers=True)
    return lambda: sum(len(x1) for x1, _, _ in loader)


def fastpred_resident(threads: int, device: str = "cpu") -> Callable[[], int]:
    from fastpred.data.resident import ResidentViews

    views = ResidentViews.from_beton(betons()[0], BATCH, RES, scale=SCALE, ratio=RATIO, seed=0, device=device)
    return lambda: _count(views, device)


def _count(views, device: str) -> int:
    n = sum(len(x1) for x1, _, _ in views)
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # the views' work is done, not only queued
    return n


MAKERS = {"fastpred_loader": fastpred_loader, "ffcv_one_view": ffcv_one_view, "torchvision": torchvision,
          "fastpred_resident": fastpred_resident}


def make_epoch(impl: str, threads: int, device: str = "cpu") -> Callable[[], int]:
    """A callable that runs one epoch of `impl` with `threads` threads or workers and returns the images it gave.
    Torch's own thread count is set to `threads` too (FFCV's Loader sets it at construction)."""
    torch.set_num_threads(threads)
    epoch = MAKERS[impl](threads, device)
    torch.set_num_threads(threads)
    return epoch


def measure(impl: str, threads: int, device: str = "cpu") -> dict:
    """One warm-up epoch, then one timed epoch: images/s (source images; two views each but for ffcv_one_view)."""
    start = time.perf_counter()
    epoch = make_epoch(impl, threads, device)
    setup = time.perf_counter() - start
    epoch()
    start = time.perf_counter()
    n = epoch()
    seconds = time.perf_counter() - start
    return {"impl": impl, "threads": threads, "views": VIEWS.get(impl, 2), "images": n, "seconds": seconds,
            "images_per_s": n / seconds, "setup_s": setup}


def table(rows: list[dict]) -> str:
    lines = ["| loader | threads / workers | views per image | images/s | views/s | epoch (s) | set-up (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['threads']} | {r['views']} | {r['images_per_s']:,.0f} | "
                     f"{r['images_per_s'] * r['views']:,.0f} | {r['seconds']:.2f} | {r['setup_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loaders_fmnist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread / worker counts to run")
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS), help="loaders to run")
    parser.add_argument("--device", default="cpu", help="where the fastpred paths put their batches")
    parser.add_argument("--beton", help="training .beton for the FFCV and resident paths (default: the cached raw "
                        "one; the torchvision path always reads the IDX files)")
    args = parser.parse_args(argv)
    from fastpred.data.errors import DataError
    from fastpred.data.loader import check_beton

    global TRAIN_BETON
    TRAIN_BETON = args.beton
    try:
        betons()
        if args.beton:
            check_beton(args.beton, {"image": "RGBImageField", "label": "IntField"})
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [measure(impl, t, args.device) for t in args.threads for impl in args.impl]
    print(table(rows))
    print(f"\n{os.cpu_count()} cores, load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
          f"torch {torch.__version__}; device {args.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
