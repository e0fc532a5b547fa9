"""The standard linear evaluation of the BYOL / SimSiam line of papers: a linear classifier on the frozen backbone's
pooled features, trained on augmented images and scored on centre crops, data-parallel over the ranks.

Settings as published in SimSiam (Chen & He, CVPR 2021, Appendix A, "Linear evaluation"): LARS, base learning
rate 0.02 scaled by batch / 256, batch 4096, momentum 0.9, weight decay 0, cosine decay over 90 epochs; training
crops are random resized crops (scale 0.08-1, aspect 3/4-4/3) with horizontal flips, evaluation the 224 centre
crop of the image resized to 256. The paper's alternative is SGD with base learning rate 30 at batch 256 (about
1% lower there). As in the official code (facebookresearch/simsiam `main_lincls.py`): the backbone stays in eval
mode (BatchNorm's running statistics are part of the frozen model), the classifier starts from N(0, 0.01)
weights and zero bias, LARS adapts both (trust coefficient 0.001), and the learning rate is set at each epoch's
start. Top-1 and top-5 are those of the last epoch's classifier.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastpred.core import distributed as collective
from fastpred.core.files import atomic_file, load_data
from fastpred.core.lars import LARS
from fastpred.data.loader import _FFCVLoader
from fastpred.eval.features import ProbeSets, eval_mode, extract_features, frozen_features
from fastpred.eval.probe import topk_correct
from fastpred.eval.source import EvalError

LINEAR_FORMAT = "fastpred-eval-linear-1"
#: The published (batch, base learning rate) of each optimizer; the learning rate is base x batch / 256.
PUBLISHED = {"lars": (4096, 0.02), "sgd": (256, 30.0)}
PUBLISHED_EPOCHS = 90
#: LARS at batch 4096 is the published setting for ImageNet (1.28M images: 312 steps per epoch). On a small set it
#: takes a step or two per epoch, 90-180 in all, and stays at chance (the digits: 0.10 after 2 epochs); SGD at
#: batch 256 takes 16x more steps. The default optimizer is LARS from this many training images on (100 steps
#: per epoch), SGD below.
LARS_MIN_IMAGES = 100 * PUBLISHED["lars"][0]
#: An epoch with fewer steps than this is warned about (an optimizer or batch the user chose).
FEW_STEPS = 10


@dataclasses.dataclass
class LinearSettings:
    epochs: int = PUBLISHED_EPOCHS
    optimizer: str = "lars"
    batch_size: int = PUBLISHED["lars"][0]  # global: all ranks together
    base_lr: float = PUBLISHED["lars"][1]
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust: float = 0.001  # LARS trust coefficient
    scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction
    seed: int = 0

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    def lr_at(self, epoch: int) -> float:
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))


def protocol_settings(train_images: int, *, optimizer: str | None = None, batch_size: int | None = None,
                      base_lr: float | None = None, epochs: int | None = None,
                      seed: int = 0) -> tuple[LinearSettings, str | None]:
    """The protocol's settings for a training set of `train_images`, with what the user gave, and a one-line note
    (None if there is nothing to say): the optimizer chosen by size when not given, or a warning when an epoch
    would take fewer than FEW_STEPS steps. The learning rate is base_lr x batch / 256 as published."""
    chosen = optimizer or ("lars" if train_images >= LARS_MIN_IMAGES else "sgd")
    batch = batch_size or PUBLISHED[chosen][0]
    if optimizer is None and batch_size is None and train_images < FEW_STEPS * batch:
        # A set too small for FEW_STEPS steps at batch 256: the largest power of two that gives them (at least 16
        # images per step); the learning rate follows the batch, as published.
        batch = max(16, 1 << max(0, (train_images // FEW_STEPS).bit_length() - 1))
    settings = LinearSettings(epochs=epochs or PUBLISHED_EPOCHS, optimizer=chosen, batch_size=batch,
                              base_lr=base_lr or PUBLISHED[chosen][1], seed=seed)
    steps = math.ceil(train_images / batch)
    if steps < FEW_STEPS:
        return settings, (f"warning: the linear protocol takes {steps} step(s) per epoch at batch {batch} on "
                          f"{train_images} training images; pass a smaller --batch-size")
    if optimizer is None and chosen == "sgd":
        return settings, (f"linear: SGD at batch {batch}, lr {settings.lr:.4g} (SimSiam's alternative) for "
                          f"{train_images} training images; the published LARS at batch 4096 is the default from "
                          f"{LARS_MIN_IMAGES} images on (--optimizer lars)")
    return settings, None


class AugmentedLoader(_FFCVLoader):
    """(x, y): one random resized crop per image (FFCV's decoder; uint8 (B, 3, H, W)) from this rank's shard of
    a fresh permutation each epoch, padded like DistributedSampler so that every rank steps equally often."""

    def __init__(self, path, batch_size: int, resolution: int, *, scale, indices, rank: int, world_size: int,
                 num_workers: int, seed: int, device):
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder

        decoder = RandomResizedCropRGBImageDecoder((resolution, resolution), scale=scale)
        super().__init__(path, batch_size, {"image": "RGBImageField", "label": "IntField"}, decoder,
                         order="random", drop_last=False, os_cache=True, num_workers=num_workers, seed=seed,
                         distributed=False, rank=rank, world_size=world_size, device=device, batches_ahead=3,
                         indices=indices)

    def __iter__(self):
        for x, y in self._batches():  # x: (B, H, W, 3)
            yield x.permute(0, 3, 1, 2), y


def linear_eval(
    backbone: nn.Module,
    feat_dim: int,
    num_classes: int,
    sets: ProbeSets,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    settings: LinearSettings,
    *,
    state_path: Path,
    source: dict,
    resume: bool,
    amp: bool,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Trains the classifier for the remaining epochs, writing `state_path` after each (rank 0, atomically),
    then scores the held-out set. Returns ``{"top1", "top5", "train_loss"}``, or None when `stop_after` epochs
    ended it early. `source` (checkpoint, step, sets) is stored with the state; `resume` continues a state whose
    settings and source are these, and is refused otherwise."""
    device, world, rank = sets.device, collective.world_size(), collective.rank()
    if settings.batch_size % world:
        raise EvalError(f"--batch-size {settings.batch_size} is not a multiple of the {world} processes")
    head = nn.Linear(feat_dim, num_classes)
    generator = torch.Generator().manual_seed(settings.seed)  # CPU: the same start on every rank and device
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    head = head.to(device)
    if world > 1:
        for p in head.parameters():  # every rank takes the step of the global batch's mean gradient
            p.register_hook(collective.all_reduce_mean)
    groups = [{"params": list(head.parameters()), "weight_decay": settings.weight_decay, "lars_exclude": False}]
    if settings.optimizer == "lars":
        optimizer = LARS(groups, lr=settings.lr, momentum=settings.momentum, eta=settings.trust)
    else:
        optimizer = torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    saved = _settings_record(settings, source)
    start, history = 0, []
    if resume:
        state = _load_state(state_path)
        if state["settings"] != saved:
            changed = sorted(k for k in saved if state["settings"].get(k) != saved[k])
            raise EvalError(f"{state_path} was trained with other settings ({', '.join(changed)}); --resume "
                            "continues with the same ones")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["train_loss"])
        log(f"resuming the linear evaluation at epoch {start} of {settings.epochs}")
    loader = AugmentedLoader(sets.paths["train"], settings.batch_size // world, sets.resolution,
                             scale=settings.scale, indices=sets.indices["train"], rank=rank, world_size=world,
                             num_workers=sets.workers, seed=settings.seed, device=device)
    flips = torch.Generator(device)
    backbone.requires_grad_(False)
    with eval_mode(backbone):
        for epoch in range(start, settings.epochs):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_at(epoch)
            loader.set_epoch(epoch)
            totals = torch.zeros(2, device=device)  # summed loss, images
            for i, (x, y) in enumerate(loader):
                flips.manual_seed(hash((settings.seed, rank, epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
                flip = torch.rand(len(x), generator=flips, device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
                with torch.no_grad():
                    feats = frozen_features(backbone, x, preprocess, amp=amp)
                loss = F.cross_entropy(head(feats), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals[0] += loss.detach() * len(y)
                totals[1] += len(y)
            collective.all_reduce_(totals)
            history.append(float(totals[0] / totals[1]))
            log(f"linear evaluation epoch {epoch + 1}/{settings.epochs}: train loss {history[-1]:.4f}, "
                f"lr {settings.lr_at(epoch):.4g}")
            if rank == 0:
                with atomic_file(state_path) as f:
                    torch.save({"format": LINEAR_FORMAT, "epoch": epoch + 1, "settings": saved,
                                "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                                "train_loss": history}, f)
            collective.barrier(f"the other processes after epoch {epoch + 1}'s state was written")
            if stop_after is not None and epoch + 1 == stop_after and epoch + 1 < settings.epochs:
                return None
        val, labels = extract_features(backbone, sets.loader("val"), preprocess, device, amp=amp, feat_dim=feat_dim)
    with torch.no_grad():
        correct = collective.all_reduce_(topk_correct(head(val), labels))
    n = sets.size("val")
    return {"top1": int(correct[0]) / n, "top5": int(correct[1]) / n, "train_loss": history}


def _settings_record(settings: LinearSettings, source: dict) -> dict:
    """What a state must match to be resumed: the protocol's settings and what is evaluated, as plain values."""
    record = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    return {**record, **source}


def _load_state(path: Path) -> dict:
    if not path.is_file():
        raise EvalError(f"--resume: no linear evaluation to resume ({path} does not exist)")
    state = load_data(path, EvalError)
    if not isinstance(state, dict) or state.get("format") != LINEAR_FORMAT:
        raise EvalError(f"{path} is not a fastpred linear evaluation state ({LINEAR_FORMAT})")
    return state


def state_in_progress(path: Path) -> str | None:
    """A note when `path` holds an unfinished linear evaluation (a fresh start would discard it), else None."""
    if not path.is_file():
        return None
    try:
        state = _load_state(path)
    except EvalError:
        return None
    epochs = state["settings"].get("epochs")
    if state["epoch"] >= epochs:
        return None
    return f"{path} holds a linear evaluation at epoch {state['epoch']} of {epochs}"
