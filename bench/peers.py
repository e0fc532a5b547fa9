"""fastpred against byol-pytorch and lightly, end to end: the same data, backbone, sizes, optimizer and machine.

    python -m bench.peers                     # every (system, augmentation, seed) not yet recorded, then the figure
    python -m bench.peers --systems byol-pytorch --augs docs --seeds 0 --epochs 1 --train-subset 4096

The protocol, the same for every system:
- data: Fashion-MNIST's 60,000 training images at 28 px (the IDX files in $FASHION_MNIST_DIR or
  /usr/share/datasets/fashion-mnist), grey stored as three equal channels (what every RGB stem expects), read
  once into memory; fastpred reads the same arrays from a raw-pixel .beton written here once, untimed;
- model: fastpred's `small_cnn` backbone (128 features), projector 128 -> 256 -> 64, each library's own
  predictor (fastpred: DirectPred; byol-pytorch and lightly: their 64 -> 256 -> 64 MLP);
- optimisation: batch 256 (last partial batch dropped), SGD lr 0.05, momentum 0.9, weight decay 4e-4, target
  EMA 0.99, the same epochs and torch thread count; each library's own loss as its documentation writes it
  (byol-pytorch sums the two directions of 2 - 2 cos, fastpred averages them, lightly takes -cos / 2 of each:
  their gradients differ by 4x / 2x / 1x at the same learning rate, a library choice kept as is);
- timing: each run is its own process, launched by this script; `wall_s` at the end of epoch k is the time
  since launch (imports, data, model built: start-up included) less the time spent saving the epoch's
  backbone; `train_s` counts the training steps only. Steady images/s are those of epochs 2..E over their
  train time (epoch 1 alone when E = 1), whole-run images/s are all images over the last epoch's `wall_s`;
- probe: after the run, untimed, fastpred's own linear probe (`fastpred.eval.linear_probe_accuracy`, softmax
  regression on standardised frozen features, 100 epochs) of each epoch's backbone, fitted on the training
  images' features and scored on the 10,000 test images', all preprocessed alike (/255, ImageNet mean and std,
  as every system's training views are).

Augmentation (`--augs`): `docs` sets each library up as its documentation shows (fastpred: its digits preset;
byol-pytorch: its default batch augmentation; lightly: `BYOLTransform` at input_size 28 with blur off, as its
CIFAR-10 examples do), `matched` sets the peers to fastpred's preset where their API allows (module docstrings
of `_byol_matched` and `_lightly_transform` say what could not be matched). fastpred has only `docs`.

Every finished run is one JSON line in RUN_ROOT/results.jsonl (default runs/peers); a row already there is not
run again, and a run whose training finished but whose probes did not is probed without retraining. The figure
(probe accuracy against wall-clock time) goes to docs/figures/peers.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

SYSTEMS = ("fastpred", "byol-pytorch", "lightly")
AUGS = ("docs", "matched")
PACKAGES = {"fastpred": "fastpred", "byol-pytorch": "byol_pytorch", "lightly": "lightly"}
DIST = {"fastpred": "fastpred", "byol-pytorch": "byol-pytorch", "lightly": "lightly"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PeerError(RuntimeError):
    """A run that cannot start (missing package or data) or that failed; the CLI prints it as one line."""


@dataclasses.dataclass
class Protocol:
    epochs: int = 3
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-4
    target_ema: float = 0.99
    proj_hidden: int = 256
    proj_dim: int = 64
    resolution: int = 28
    crop_scale: float = 0.3  # fastpred's digits preset: smallest area of a random resized crop
    threads: int = 2  # torch's intra-op threads in every run
    loader_workers: int = 2  # lightly's DataLoader processes (its per-image PIL pipeline)
    train_subset: int = 0  # first N training images (0: all 60,000)
    test_subset: int = 0  # first N test images for the probe (0: all 10,000)
    probe_epochs: int = 100
    fastpred_args: str = ""  # extra flags for `python -m fastpred.train`, e.g. "--workers 1"

    def key(self, system: str, aug: str, seed: int, tag: str) -> str:
        fields = [system, aug, f"seed{seed}", f"e{self.epochs}", f"t{self.threads}", f"n{self.train_subset}"]
        if system == "lightly":
            fields.append(f"w{self.loader_workers}")
        if system == "fastpred" and self.fastpred_args:
            fields.append(self.fastpred_args.replace(" ", ""))
        return "-".join(fields + ([tag] if tag else []))


# ---- data, backbone, probe: one of each for every system ---------------------------------------------------


def fashion_mnist(split: str, subset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, 28, 28), three equal channels, and int64 labels (N,) of one split; the first `subset`."""
    from fastpred.data.idx import idx_files, read_idx

    folder = Path(os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    if not folder.is_dir():
        raise PeerError(f"no Fashion-MNIST folder {folder}: `apt-get install -y dataset-fashion-mnist` or set "
                        "FASHION_MNIST_DIR")
    images_path, labels_path = idx_files(folder, split)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if subset:
        images, labels = images[:subset], labels[:subset]
    x = torch.from_numpy(np.array(images)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))


def small_cnn() -> tuple[nn.Module, int]:
    """fastpred's `small_cnn` backbone and its feature width, from wherever the package keeps it now."""
    for module in ("fastpred.core.models", "fastpred.models", "fastpred.train.models"):
        with contextlib.suppress(ImportError):
            build = getattr(importlib.import_module(module), "build_backbone", None)
            if build is not None:
                return build("small_cnn")
    raise PeerError("fastpred's build_backbone was not found in any known module")


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> what every system's training views look like: /255, ImageNet mean and std."""
    from fastpred.data.augment import normalize_ref

    return normalize_ref(x.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 1024):
    return ((x[i : i + size], y[i : i + size]) for i in range(0, len(x), size))


def probe(state: dict, train: tuple, test: tuple, *, epochs: int, seed: int = 0) -> float:
    """fastpred's linear probe (standardised frozen features) of a small_cnn backbone state: test top-1."""
    from fastpred.eval import extract_features, linear_probe_accuracy

    backbone, feat_dim = small_cnn()
    backbone.load_state_dict(state)
    xt, yt = extract_features(backbone, _batches(*train), preprocess, "cpu", feat_dim=feat_dim)
    xv, yv = extract_features(backbone, _batches(*test), preprocess, "cpu", feat_dim=feat_dim)
    return linear_probe_accuracy(xt, yt, xv, yv, epochs=epochs, seed=seed, device="cpu")


# ---- the runs: one process each ------------------------------------------------------------------------------


class Clock:
    """Per-epoch times of a run in its own process: `wall_s` since the launcher's `launched_at` (time.time, the
    same clock in both processes) less the time spent saving snapshots; `train_s` of the steps alone."""

    def __init__(self, launched_at: float, out: Path, images_per_epoch: int):
        self.launched_at, self.out, self.images_per_epoch = launched_at, out, images_per_epoch
        self.excluded = self.train_s = 0.0
        self.epochs: list[dict] = []
        self._t0 = 0.0

    def start_epoch(self) -> None:
        self._t0 = time.perf_counter()

    def end_epoch(self, backbone: nn.Module, loss: torch.Tensor) -> None:
        wall = time.time() - self.launched_at - self.excluded
        self.train_s += time.perf_counter() - self._t0
        t = time.perf_counter()
        epoch = len(self.epochs) + 1
        torch.save({k: v.detach().clone() for k, v in backbone.state_dict().items()}, self.out / f"epoch{epoch}.pt")
        self.epochs.append({"epoch": epoch, "wall_s": wall, "train_s": self.train_s, "loss": float(loss.detach())})
        self.excluded += time.perf_counter() - t

    def save(self) -> None:
        record = {"images_per_epoch": self.images_per_epoch, "epochs": self.epochs}
        (self.out / "timing.json").write_text(json.dumps(record))


def _byol_matched(p: Protocol) -> dict:
    """byol-pytorch's `augment_fn` / `augment_fn2` set to fastpred's digits preset: crop (scale 0.3-1, 28 px)
    and flip first, jitter (0.4, 0.4, 0.2, 0.1; p 0.8), grey (p 0.2), blur (3x3, sigma 0.1-2; p 1.0 / 0.1),
    solarize (p 0 / 0.2), ImageNet normalisation. Matched: every op, range, probability, order and the
    asymmetric pair. Not matched: byol-pytorch applies `augment_fn` to the whole batch tensor, and torchvision's
    transforms draw their parameters once per call, so every image of a batch shares one crop, one flip, one
    jitter, one blur sigma (fastpred draws all of them per image)."""
    from byol_pytorch.byol_pytorch import RandomApply
    from torchvision import transforms as T

    from fastpred.data.augment import blur_kernel_size

    ks = blur_kernel_size(p.resolution, p.resolution)

    def view(p_blur: float, p_solarize: float) -> nn.Module:
        ops = [
            T.RandomResizedCrop((p.resolution, p.resolution), scale=(p.crop_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            RandomApply(T.ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8),
            T.RandomGrayscale(p=0.2),
            RandomApply(T.GaussianBlur((ks, ks), (0.1, 2.0)), p=p_blur),
            T.RandomSolarize(0.5, p=p_solarize),
            T.Normalize(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD)),
        ]
        return nn.Sequential(*ops)

    return {"augment_fn": view(1.0, 0.0), "augment_fn2": view(0.1, 0.2)}


def _train_byol_pytorch(p: Protocol, aug: str, seed: int, clock: Clock) -> None:
    """byol-pytorch as its README shows: BYOL(net, ...) called on a batch of images returns the loss; its own
    augmentation runs inside, on the batch. The images stay in memory as one uint8 tensor; each epoch is a
    seeded permutation cut into full batches."""
    from byol_pytorch import BYOL

    x, _ = fashion_mnist("train", p.train_subset)
    net, _ = small_cnn()
    learner = BYOL(net, image_size=p.resolution, hidden_layer=-1, projection_size=p.proj_dim,
                   projection_hidden_size=p.proj_hidden, moving_average_decay=p.target_ema,
                   **(_byol_matched(p) if aug == "matched" else {}))
    opt = torch.optim.SGD(learner.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps = len(x) // p.batch_size
    for _ in range(p.epochs):
        clock.start_epoch()
        for idx in torch.randperm(len(x), generator=g)[: steps * p.batch_size].view(steps, p.batch_size):
            loss = learner(x[idx].float().div_(255.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
            learner.update_moving_average()
        clock.end_epoch(net, loss)


class _PILImages(torch.utils.data.Dataset):
    """(transform(PIL RGB image), label) per index, as a torchvision data set with `transform` serves them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i], mode="RGB")), int(self.y[i])


def _lightly_transform(p: Protocol, aug: str):
    """lightly's BYOLTransform. docs: input_size 28 and blur off, as its CIFAR-10 examples set it for small
    images. matched: fastpred's preset; lightly's defaults are already BYOL's colour ops (jitter 0.4, 0.4, 0.2,
    0.1 at p 0.8, grey 0.2, blur p 1.0 / 0.1 with sigma 0.1-2, solarize p 0 / 0.2), all drawn per image, so only
    the crop scale is set (0.3). Not matched: its blur is PIL's GaussianBlur(radius=sigma), a kernel as wide as
    sigma needs, where fastpred blurs with 3 taps at 28 px (BYOL's 10% of the side)."""
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    if aug == "docs":
        kw1 = kw2 = {"input_size": p.resolution, "gaussian_blur": 0.0}
    else:
        kw1 = kw2 = {"input_size": p.resolution, "min_scale": p.crop_scale}
    return BYOLTransform(view_1_transform=BYOLView1Transform(**kw1), view_2_transform=BYOLView2Transform(**kw2))


def _train_lightly(p: Protocol, aug: str, seed: int, clock: Clock) -> None:
    """lightly as its BYOL example shows (plain PyTorch): BYOLProjectionHead / BYOLPredictionHead, a momentum
    copy updated by `update_momentum` before each step, NegativeCosineSimilarity, BYOLTransform per image in a
    DataLoader (shuffle, drop_last); the momentum is the protocol's constant 0.99, not the example's cosine."""
    import copy

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    class BYOL(nn.Module):
        def __init__(self, backbone: nn.Module, feat_dim: int):
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(feat_dim, p.proj_hidden, p.proj_dim)
            self.prediction_head = BYOLPredictionHead(p.proj_dim, p.proj_hidden, p.proj_dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    x, y = fashion_mnist("train", p.train_subset)
    model = BYOL(*small_cnn())
    loader = torch.utils.data.DataLoader(
        _PILImages(x, y, _lightly_transform(p, aug)), batch_size=p.batch_size, shuffle=True, drop_last=True,
        num_workers=p.loader_workers, generator=torch.Generator().manual_seed(seed),
    )
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    for _ in range(p.epochs):
        clock.start_epoch()
        for (x0, x1), _ in loader:
            update_momentum(model.backbone, model.backbone_momentum, m=p.target_ema)
            update_momentum(model.projection_head, model.projection_head_momentum, m=p.target_ema)
            p0, z0 = model(x0), model.forward_momentum(x0)
            p1, z1 = model(x1), model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        clock.end_epoch(model.backbone, loss)


def worker(args: argparse.Namespace, p: Protocol) -> None:
    """One peer run in this process (`--worker SYSTEM`): seeds, threads, train, snapshots and timing.json."""
    torch.set_num_threads(p.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.run_dir)
    n = p.train_subset or 60000
    clock = Clock(args.launched_at, out, n // p.batch_size * p.batch_size)
    train = {"byol-pytorch": _train_byol_pytorch, "lightly": _train_lightly}[args.worker]
    train(p, args.aug, args.seed, clock)
    clock.save()


def _fastpred_betons(p: Protocol, root: Path) -> tuple[Path, Path]:
    """The peers' arrays as raw-pixel .beton files (written once, untimed): fastpred trains on the same images."""
    from fastpred.data.sources import ArraySource
    from fastpred.data.write import write_beton

    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, subset in (("train", p.train_subset), ("test", p.test_subset)):
        path = folder / f"fashion-mnist-{split}-{subset or 'all'}.beton"
        if not path.exists():
            x, y = fashion_mnist(split, subset)
            source = ArraySource(x.permute(0, 2, 3, 1).numpy(), y.numpy(), f"Fashion-MNIST {split}")
            write_beton(source, path, compress_probability=0.0, max_resolution=None, workers=1)
        paths.append(path)
    return paths[0], paths[1]


def fastpred_command(p: Protocol, seed: int, run_dir: Path, train: Path, test: Path) -> list[str]:
    """`python -m fastpred.train` with the protocol's settings: the digits preset (small_cnn, crop scale 0.3),
    28 px, no kNN monitor and no final probe (the common probe runs afterwards), a checkpoint kept per epoch."""
    return [
        sys.executable, "-m", "fastpred.train", "--data", str(train), "--val", str(test), "--preset", "digits",
        "--resolution", str(p.resolution), "--batch-size", str(p.batch_size), "--epochs", str(p.epochs),
        "--lr", str(p.lr), "--momentum", str(p.momentum), "--weight-decay", str(p.weight_decay),
        "--target-ema", str(p.target_ema), "--proj-hidden", str(p.proj_hidden), "--proj-dim", str(p.proj_dim),
        "--crop-scale", str(p.crop_scale), "--threads", str(p.threads), "--knn-every", "0",
        "--final-probe", "false", "--keep-every", "1", "--spectrum-every", "0", "--seed", str(seed),
        "--out", str(run_dir), "--progress", "plain", *p.fastpred_args.split(),
    ]


def _fastpred_timing(run_dir: Path, launched_at: float, images_per_epoch: int) -> dict:
    """timing.json's record from a fastpred run folder: train_s from metrics.jsonl (the trainer's own train time
    at each epoch's end), wall_s from the mtime of the epoch's kept checkpoint (written at that epoch's end)."""
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    ends = {round(r["epoch"]): r for r in lines if r.get("kind") == "train" and float(r["epoch"]).is_integer()}
    epochs = []
    for path in sorted(run_dir.glob("checkpoint-epoch*.pt")):
        epoch = int(path.stem.removeprefix("checkpoint-epoch"))
        state = torch.load(path, map_location="cpu", weights_only=True)
        torch.save(state["backbone"], run_dir / f"epoch{epoch}.pt")
        epochs.append({"epoch": epoch, "wall_s": path.stat().st_mtime - launched_at,
                       "train_s": ends[epoch]["time_s"], "loss": ends[epoch]["loss"]})
    return {"images_per_epoch": images_per_epoch, "epochs": epochs}


# ---- the launcher ---------------------------------------------------------------------------------------------


def _version(system: str) -> str:
    try:
        return importlib.metadata.version(DIST[system])
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def available(system: str) -> str | None:
    """None when `system` can run here, else why not (one line)."""
    if importlib.util.find_spec(PACKAGES[system]) is None:
        return f"{system} is not installed (pip install 'fastpred[bench]' pins the peers' versions)"
    return None


def train_run(p: Protocol, system: str, aug: str, seed: int, run_dir: Path, root: Path) -> dict:
    """Launch one run as its own process; returns its timing record (also in run_dir/timing.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.txt"
    env = {**os.environ, "OMP_NUM_THREADS": str(p.threads)}
    if system == "fastpred":
        train, test = _fastpred_betons(p, root)
        fresh = run_dir / "run"
        if fresh.exists():  # an unfinished run: start it again from scratch (its times would mix two launches)
            import shutil

            shutil.rmtree(fresh)
        cmd = fastpred_command(p, seed, fresh, train, test)
    else:
        cmd = [sys.executable, "-m", "bench.peers", "--worker", system, "--aug", aug, "--seed", str(seed),
               "--run-dir", str(run_dir), *protocol_flags(p)]
    launched_at = time.time()
    with open(log, "w") as f:
        done = subprocess.run([*cmd, "--launched-at", repr(launched_at)] if system != "fastpred" else cmd,
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise PeerError(f"{system} run failed (exit {done.returncode}; log {log}): {tail[0]}")
    if system == "fastpred":
        n = p.train_subset or 60000
        timing = _fastpred_timing(run_dir / "run", launched_at, n // p.batch_size * p.batch_size)
        for e in timing["epochs"]:
            os.replace(run_dir / "run" / f"epoch{e['epoch']}.pt", run_dir / f"epoch{e['epoch']}.pt")
        (run_dir / "timing.json").write_text(json.dumps(timing))
    timing = json.loads((run_dir / "timing.json").read_text())
    timing["command"] = " ".join(cmd)
    return timing


def summarise(timing: dict) -> dict:
    """Steady and whole-run images/s of a timing record."""
    e, n = timing["epochs"], timing["images_per_epoch"]
    if len(e) > 1:
        steady = n * (len(e) - 1) / (e[-1]["train_s"] - e[0]["train_s"])
    else:
        steady = n / e[0]["train_s"]
    return {"steady_img_s": steady, "run_img_s": n * len(e) / e[-1]["wall_s"], "wall_s": e[-1]["wall_s"],
            "train_s": e[-1]["train_s"]}


def probe_points(p: Protocol, timing: dict, run_dir: Path, probe_data=None) -> list[dict]:
    """timing's epochs, each with the probe of that epoch's backbone (run_dir/epochK.pt)."""
    train, test = probe_data or load_probe_data(p)
    points = []
    for e in timing["epochs"]:
        state = torch.load(run_dir / f"epoch{e['epoch']}.pt", map_location="cpu", weights_only=True)
        points.append({**e, "probe": probe(state, train, test, epochs=p.probe_epochs)})
    return points


def load_probe_data(p: Protocol) -> tuple[tuple, tuple]:
    return fashion_mnist("train", p.train_subset), fashion_mnist("test", p.test_subset)


def baselines(p: Protocol, root: Path, seeds: list[int], probe_data=None) -> dict:
    """What the probe gives without any training, to read the runs against: small_cnn at random initialisation
    (torch.manual_seed(seed), per seed) and the raw pixels (preprocessed alike). Cached in root per subset."""
    from fastpred.eval import linear_probe_accuracy

    path = root / f"baselines-n{p.train_subset}-t{p.test_subset}-p{p.probe_epochs}.json"
    known = json.loads(path.read_text()) if path.exists() else {"random_init": {}}
    missing = [s for s in seeds if str(s) not in known["random_init"]]
    if missing or "raw_pixels" not in known:
        (xt, yt), (xv, yv) = probe_data or load_probe_data(p)
        for seed in missing:
            torch.manual_seed(seed)
            known["random_init"][str(seed)] = probe(small_cnn()[0].state_dict(), (xt, yt), (xv, yv),
                                                    epochs=p.probe_epochs)
        if "raw_pixels" not in known:
            known["raw_pixels"] = linear_probe_accuracy(preprocess(xt).flatten(1), yt, preprocess(xv).flatten(1), yv,
                                                        epochs=p.probe_epochs, seed=0, device="cpu")
        path.write_text(json.dumps(known))
    return known


def run_one(p: Protocol, system: str, aug: str, seed: int, root: Path, tag: str = "", probe_data=None) -> dict:
    """Train (unless run_dir already holds a finished run), probe every epoch's backbone, and return the row."""
    key = p.key(system, aug, seed, tag)
    run_dir = root / key
    timing_path = run_dir / "timing.json"
    if timing_path.exists() and len(json.loads(timing_path.read_text())["epochs"]) == p.epochs:
        timing = json.loads(timing_path.read_text())
        timing.setdefault("command", "(trained by an earlier invocation)")
    else:
        timing = train_run(p, system, aug, seed, run_dir, root)
    return {
        "key": key, "system": system, "aug": aug, "seed": seed, "tag": tag, **summarise(timing),
        "points": probe_points(p, timing, run_dir, probe_data), "command": timing["command"],
        "protocol": dataclasses.asdict(p),
        "version": _version(system), "torch": torch.__version__, "device": _cpu_name(), "cores": os.cpu_count(),
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "loadavg_end": list(os.getloadavg()),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


def probe_at(row: dict, t: float) -> float | None:
    """The probe of the last backbone a run had saved by wall-clock time t (what its user would hold then)."""
    held = [pt["probe"] for pt in row["points"] if pt["wall_s"] <= t]
    return held[-1] if held else None


def equal_time_leads(rows: list[dict], system: str = "fastpred") -> list[str]:
    """For each peer run and the `system` run of the same seed: `system`'s probe minus the peer's at every wall-clock
    time where both have saved a backbone (the times of either's points), its smallest value and where, and the
    interval in which only the peer holds one (it saved its first backbone earlier). One line per pair."""
    mine = {r["seed"]: r for r in rows if r["system"] == system}
    lines = []
    for peer in sorted((r for r in rows if r["system"] != system), key=lambda r: (r["system"], r["aug"], r["seed"])):
        own = mine.get(peer["seed"])
        if own is None:
            continue
        times = sorted({pt["wall_s"] for pt in own["points"] + peer["points"]})
        held = [(t, probe_at(own, t), probe_at(peer, t)) for t in times]
        diffs = [(mine_t - theirs, t) for t, mine_t, theirs in held if mine_t is not None and theirs is not None]
        alone = [t for t, mine_t, theirs in held if mine_t is None and theirs is not None]
        name = f"{peer['system']} ({peer['aug']}), seed {peer['seed']}"
        if not diffs:
            lines.append(f"{system} against {name}: no time at which both hold a backbone")
            continue
        worst, at = min(diffs)
        verdict = "ahead at every time both hold a backbone" if worst > 0 else "not ahead at every time"
        line = f"{system} against {name}: {verdict} (smallest lead {worst:+.3f} at {at:.0f} s)"
        if alone:
            first = min(pt["wall_s"] for pt in own["points"])
            line += f"; only {peer['system']} holds one from {alone[0]:.0f} s to {first:.0f} s"
        lines.append(line)
    return lines


def table(rows: list[dict]) -> str:
    """Markdown: one line per (system, augmentation), medians and ranges over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["aug"], r.get("tag", "")), []).append(r)

    def spread(values, fmt):
        values = sorted(values)
        mid = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values)
                                                                                                    // 2]) / 2
        return fmt.format(mid) + (f" ({fmt.format(values[0])}-{fmt.format(values[-1])})" if len(values) > 1 else "")

    epochs = max(len(r["points"]) for r in rows)
    head = ("| system | augmentation | seeds | images/s steady | images/s whole run | wall s | "
            + " | ".join(f"probe ep {k + 1} (at s)" for k in range(epochs)) + " |")
    lines = [head, "|" + "---|" * (6 + epochs)]
    for (system, aug, tag), rs in sorted(groups.items()):
        cells = [f"{system} {_version(system) if system != 'fastpred' else ''}".strip() + (f" [{tag}]" if tag else ""),
                 aug, ",".join(str(r["seed"]) for r in rs), spread([r["steady_img_s"] for r in rs], "{:,.0f}"),
                 spread([r["run_img_s"] for r in rs], "{:,.0f}"), spread([r["wall_s"] for r in rs], "{:.0f}")]
        for k in range(epochs):
            pts = [r["points"][k] for r in rs if len(r["points"]) > k]
            cells.append(spread([pt["probe"] for pt in pts], "{:.3f}") + " @ "
                         + spread([pt["wall_s"] for pt in pts], "{:.0f}") if pts else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path, base: dict | None = None) -> None:
    """Probe accuracy against wall-clock time: one colour per system, solid for docs and dashed for matched
    augmentation (dotted for a tagged variant), one line per seed; grey lines: the untrained baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"fastpred": "tab:red", "byol-pytorch": "tab:blue", "lightly": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for r in sorted(rows, key=lambda r: (r["system"], r["aug"], r["seed"])):
        name = f"{r['system']} ({r['aug']}" + (f", {r['tag']}" if r.get("tag") else "") + ")"
        ax.plot([pt["wall_s"] for pt in r["points"]], [pt["probe"] for pt in r["points"]], marker="o",
                color=colours.get(r["system"], "k"),
                linestyle=":" if r.get("tag") else "-" if r["aug"] == "docs" else "--",
                alpha=0.85, label=None if name in labelled else name)
        labelled.add(name)
    if base:
        inits = list(base["random_init"].values())
        ax.axhspan(min(inits), max(inits), color="0.85", zorder=0, label="random init (seeds)")
        ax.axhline(base["raw_pixels"], color="0.5", linestyle="-.", linewidth=1, label="raw pixels")
    p = rows[0]["protocol"]
    n = f"{p['train_subset']:,}" if p["train_subset"] else "60,000"
    ax.set_xlabel("wall-clock time since launch, s (start-up included, probes excluded)")
    ax.set_ylabel("linear probe top-1 (Fashion-MNIST test)")
    ax.set_title(f"BYOL, Fashion-MNIST ({n} training images), small_cnn, batch {p['batch_size']}, "
                 f"{p['threads']} torch threads", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def protocol_flags(p: Protocol) -> list[str]:
    out = []
    for f in dataclasses.fields(Protocol):
        out += [f"--{f.name.replace('_', '-')}", str(getattr(p, f.name))]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from " + ", ".join(SYSTEMS))
    parser.add_argument("--augs", default=",".join(AUGS), help="docs, matched (fastpred runs docs only)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--root", default="runs/peers", help="run folders and results.jsonl")
    parser.add_argument("--figure", default="docs/figures/peers.png")
    parser.add_argument("--tag", default="", help="a label kept in the key, e.g. a fastpred variant")
    for f in dataclasses.fields(Protocol):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--worker", choices=("byol-pytorch", "lightly"), help=argparse.SUPPRESS)
    parser.add_argument("--aug", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    p = Protocol(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Protocol)})
    if args.worker:
        worker(args, p)
        return 0
    try:
        systems, augs = args.systems.split(","), args.augs.split(",")
        seeds = [int(s) for s in args.seeds.split(",")]
        for name in systems:
            if name not in SYSTEMS:
                raise PeerError(f"unknown system {name!r} (choose from {', '.join(SYSTEMS)})")
        for aug in augs:
            if aug not in AUGS:
                raise PeerError(f"unknown augmentation {aug!r} (choose from {', '.join(AUGS)})")
        root = Path(args.root)
        root.mkdir(parents=True, exist_ok=True)
        results = root / "results.jsonl"
        done = {r["key"] for r in read_rows(results)}
        probe_data = None
        for seed in seeds:
            for system in systems:
                for aug in augs:
                    if system == "fastpred" and aug != "docs":
                        continue
                    key = p.key(system, aug, seed, args.tag)
                    if key in done:
                        continue
                    why = available(system)
                    if why:
                        print(f"skipped {key}: {why}", flush=True)
                        continue
                    print(f"running {key}", flush=True)
                    probe_data = probe_data or load_probe_data(p)
                    row = run_one(p, system, aug, seed, root, args.tag, probe_data)
                    with open(results, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    probes = " ".join(f"{pt['probe']:.3f}@{pt['wall_s']:.0f}s" for pt in row["points"])
                    print(f"{key}: {row['steady_img_s']:,.0f} img/s steady, {row['run_img_s']:,.0f} whole run, "
                          f"probe {probes}", flush=True)
        rows = [r for r in read_rows(results) if r["protocol"]["epochs"] == p.epochs
                and r["protocol"]["train_subset"] == p.train_subset]
        if rows:
            base = baselines(p, root, sorted({r["seed"] for r in rows}), probe_data)
            print(table(rows))
            inits = ", ".join(f"{v:.3f} (seed {k})" for k, v in base["random_init"].items())
            print(f"untrained: random init {inits}; raw pixels {base['raw_pixels']:.3f}")
            for line in equal_time_leads(rows):
                print(line)
            if args.figure:
                figure(rows, Path(args.figure), base)
                print(f"figure: {args.figure}")
    except PeerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
