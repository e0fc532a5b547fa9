"""Every setting of a run: one dataclass, the presets, and the `--key value` flags derived from it.

A run's settings resolve in this order: the dataclass defaults, then the preset (`--preset`, default `digits`),
then the flags given on the command line. `config.json` in the run folder holds the result, and `--resume`
reads it back.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass

from fastpred.core.models import BACKBONES, PREDICTORS
from fastpred.data.named import NAMED_SOURCES
from fastpred.kernels._common import FILTERS
from fastpred.train.optim import OPTIMIZERS, SCHEDULES


class ConfigError(ValueError):
    """A setting or combination of settings that cannot run; the CLI prints it as one line."""


@dataclass
class Config:
    # --- what to train
    data: str = "digits"  # a .beton path, digits (embedded default), fashion-mnist or synthetic (random images)
    val: str | None = None  # held-out .beton for the probes; default: a named source's test split, or a training slice
    preset: str = "digits"  # the settings below, as published for that data set (every flag overrides them)
    method: str = "byol"  # byol (EMA target) or simsiam (the online network, stop-gradient, is the target)
    predictor: str = "directpred"  # directpred, directcopy, linear, mlp, offdiag or none
    loss: str = "cosine"  # cosine (BYOL/SimSiam), or iso: IsoLoss, every eigenmode of W learns at one rate
    # --- DirectPredictor (directpred / directcopy only)
    rho: float = 0.3  # EMA coefficient of F
    eps: float = 0.1  # added to every normalised eigenvalue
    alpha: float | None = None  # exponent on the eigenvalues; default 0.5 (directpred) or 1 (directcopy)
    filter: str = "power"  # g of F's spectrum: power (s^alpha), or log, log1p, log1p_sq of the batch's singular values
    freq: int = 1  # recompute W after every freq-th step
    groups: int = 1  # block-diagonal predictor with this many blocks
    backend: str = "auto"  # DirectPredictor backend: auto (triton on CUDA, torch on the CPU), torch, triton
    sweeps: int = 6  # Jacobi sweep cap per refresh (triton backend)
    solver: str = "jacobi"  # triton backend's eigensolver: jacobi, or orth (orth. iteration + Jacobi, d/groups <= 64)
    trainable: bool = False  # train W by gradient between refreshes (the paper's freq > 1 variant)
    # --- mlp predictor only
    pred_hidden: int = 512  # hidden width of the MLP predictor
    # --- trained predictors only (linear, mlp, offdiag, or directpred with --trainable)
    pred_lr: float | None = None  # the predictor's own base learning rate (default: --lr), scaled like --lr
    pred_wd: float | None = None  # the predictor's own weight decay (default: --weight-decay)
    pred_lr_fixed: bool = False  # keep the predictor's learning rate constant while the encoder's is scheduled
    pred_reg: str = "none"  # linear head only: symmetric makes W symmetric after every step (the official default)
    # --- model
    backbone: str = "small_cnn"  # small_cnn, resnet18_small (3x3 stem, no max-pool), resnet18, resnet50
    proj_hidden: int = 256  # projector Linear-BN-ReLU-Linear hidden width
    proj_dim: int = 64  # projector output width d (the predictor's dimension)
    sync_bn: bool = True  # BatchNorm statistics over all processes under torchrun, online and target (as BYOL)
    # --- data and augmentation
    resolution: int = 32  # side of the training views (and of the probes' centre crops)
    crop_scale: float = 0.08  # smallest area fraction of a random resized crop
    workers: int = -1  # FFCV decoding threads per process (-1: this process's share of the usable cores)
    threads: int = -1  # torch's CPU threads per process (-1: this process's share of the usable cores)
    resident: str = "auto"  # training set held on the device, views cut there: auto (one size, within budget), on, off
    resident_max_mb: float = 0.0  # --resident's budget in MiB per process (0: 25% of the GPU's memory; CPU: 2048)
    # --- optimisation
    epochs: int = 100
    batch_size: int = 128  # images per process and step (two views each); the global batch is this x processes
    optimizer: str = "sgd"  # sgd or lars (LARS excludes biases and norm parameters from adaptation and decay)
    lr: float = 0.03  # base learning rate; with lr_scaling=linear, lr x global batch / 256
    lr_scaling: str = "none"  # none or linear
    momentum: float = 0.9
    weight_decay: float = 4e-4
    exclude_bias_norm: bool = False  # no weight decay (and no LARS adaptation) on biases and norm parameters
    warmup_epochs: float = 0.0  # linear warm-up of the learning rate
    schedule: str = "constant"  # learning-rate schedule after warm-up: constant or cosine (to 0)
    target_ema: float = 0.996  # BYOL target momentum
    target_ema_schedule: str = "constant"  # constant, or cosine (BYOL: rises from target_ema to 1)
    # --- speed
    device: str = "auto"  # auto (cuda if present), cpu, cuda
    compile: bool = False  # torch.compile the backbone and projector
    amp: bool = True  # bf16 autocast on CUDA (on the CPU only with --cpu-amp or --cuda-rehearsal)
    channels_last: bool = True  # channels-last memory format of images and convolutions (CUDA and CPU)
    cuda_rehearsal: bool = False  # on the CPU, run the step as on CUDA: --amp applies there too
    cpu_amp: bool = False  # bf16 autocast on the CPU too: opt-in (a precision change); needs bf16 instructions
    synthetic_steps: int = 20  # steps per epoch with --data synthetic
    max_steps: int = 0  # stop after this many steps in all (0: no limit); for benchmarks and smoke runs
    # --- evaluation and logging
    probe_lr: float = 1e-3  # online linear probe's learning rate (its own Adam)
    knn_every: int = 1  # kNN monitor every k epochs (0: never) on the held-out set
    knn_k: int = 20
    final_probe: bool = True  # linear probe on frozen features at the end, and on a random-init backbone
    final_probe_epochs: int = 100
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tensorboard (fastpred[tensorboard])
    dist_timeout: float = 30.0  # minutes a collective waits for the slowest process under torchrun before failing
    start_timeout: float = 300.0  # seconds the processes under torchrun wait for each other to start (then exit 5)
    stop_within: float = 20.0  # seconds from a stop signal to its checkpoint on disk, planned for (torchrun gives 30)
    log_every: int = 10  # steps per metrics line
    spectrum_every: int = 50  # record F's and W's spectra every k steps (0: never)
    progress: str = "auto"  # auto (a bar on a terminal), bar, plain
    seed: int = 0
    # --- run folder
    out: str | None = None  # default runs/<date>-<time>-<preset>
    resume: str | None = None  # a run folder to continue
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch and a signal always write one)
    keep_every: int = 0  # also keep checkpoint-epochNNNN.pt every k epochs (0: keep only the latest, checkpoint.pt)
    auto_resume: bool = False  # with --out DIR: start the run there, or continue it if DIR holds this same run
    max_nonfinite_steps: int = 3  # the loss non-finite this many steps in a row ends the run as diverged (0: off)

    @property
    def uses_direct(self) -> bool:
        return self.predictor in ("directpred", "directcopy")

    @property
    def trained_predictor(self) -> bool:
        return self.predictor in ("linear", "mlp", "offdiag") or (self.uses_direct and self.trainable)

    @property
    def own_predictor_optimizer(self) -> bool:
        return self.pred_lr is not None or self.pred_wd is not None or self.pred_lr_fixed


#: Flags that only mean something with certain settings: flag -> (what it needs, a test on the config).
_APPLIES: dict[str, tuple[str, typing.Callable[[Config], bool]]] = {
    **{k: ("--predictor directpred or directcopy", lambda c: c.uses_direct)
       for k in ("rho", "eps", "alpha", "filter", "freq", "groups", "backend", "sweeps", "solver", "trainable")},
    "pred_hidden": ("--predictor mlp", lambda c: c.predictor == "mlp"),
    **{k: ("a trained predictor (linear, mlp, offdiag, or directpred/directcopy with --trainable)",
           lambda c: c.trained_predictor) for k in ("pred_lr", "pred_wd", "pred_lr_fixed")},
    "pred_reg": ("--predictor linear", lambda c: c.predictor == "linear"),
    "target_ema": ("--method byol", lambda c: c.method == "byol"),
    "target_ema_schedule": ("--method byol", lambda c: c.method == "byol"),
    "val": ("--data PATH.beton", lambda c: c.data not in (*NAMED_SOURCES, "synthetic")),
    "workers": ("a .beton or a named source (not --data synthetic)", lambda c: c.data != "synthetic"),
    "synthetic_steps": ("--data synthetic", lambda c: c.data == "synthetic"),
    "cpu_amp": ("--amp true", lambda c: c.amp),
    **{k: ("a .beton or a named source (not --data synthetic)", lambda c: c.data != "synthetic")
       for k in ("resident", "resident_max_mb")},
}

PRESETS: dict[str, dict[str, typing.Any]] = {
    # Small enough that `python -m fastpred.train` finishes in well under three minutes on a 2-core CPU. One FFCV
    # thread and one torch thread, a core each: on a 2-core machine two FFCV threads were 15% faster when idle but
    # 8x slower when other processes were busy.
    "digits": dict(
        backbone="small_cnn", proj_hidden=256, proj_dim=64, resolution=16, crop_scale=0.3, epochs=30,
        batch_size=128, optimizer="sgd", lr=0.05, weight_decay=4e-4, target_ema=0.99, pred_hidden=256,
        spectrum_every=10, log_every=5, workers=1, threads=1, keep_every=10,
    ),
    # Fashion-MNIST (`--data fashion-mnist`): 60,000 28x28 grey images. The digits recipe (SGD 0.05, EMA 0.99,
    # projector 256-64; tried on this data in 3 epochs: probe 0.850) with what a real set needs: 1024 backbone
    # features (small_cnn_1024: the probe reads them; 40 epochs gave 0.904 against 0.898 with 512 and 0.885 with
    # 256, for 1.9x small_cnn_wide's step time on the CPU: about 38 min of training on two cores at the measured
    # 1,068 images/s), crops of at least 20% of the image (at 28 px an 8% crop of a shirt is a few pixels of
    # texture; 8% was no better), a cosine decay over a longer schedule. Colour: brightness, contrast, blur and
    # solarize act on grey images; saturation, hue and grayscale do nothing to them (R = G = B) and cost nothing
    # on the CPU path, which skips them for grey batches. The set (141 MB as three channels) is held on the
    # device: every core goes to the step. On a GPU, the same preset with a longer `--epochs` is the full-length
    # run.
    "fashion-mnist": dict(
        backbone="small_cnn_1024", proj_hidden=256, proj_dim=64, resolution=28, crop_scale=0.2, epochs=40,
        batch_size=256, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=4e-4, warmup_epochs=1,
        schedule="cosine", target_ema=0.99, pred_hidden=256, knn_every=5, final_probe_epochs=100, log_every=20,
        spectrum_every=100, keep_every=10, workers=1,
    ),
    # The official DirectPred code's CIFAR-10 / STL-10 configuration (facebookresearch/luckmatters ssl).
    "cifar10": dict(
        backbone="resnet18_small", proj_hidden=512, proj_dim=128, resolution=32, epochs=100, batch_size=128,
        optimizer="sgd", lr=0.03, momentum=0.9, weight_decay=4e-4, target_ema=0.996, pred_hidden=512, keep_every=20,
    ),
    "stl10": dict(
        backbone="resnet18_small", proj_hidden=512, proj_dim=128, resolution=96, epochs=100, batch_size=128,
        optimizer="sgd", lr=0.03, momentum=0.9, weight_decay=4e-4, target_ema=0.996, pred_hidden=512, keep_every=20,
    ),
    # BYOL's ImageNet recipe (Grill et al. 2020): LARS, base lr 0.2 per 256 images, cosine, EMA 0.996 -> 1.
    "imagenet": dict(
        backbone="resnet50", proj_hidden=4096, proj_dim=256, resolution=224, epochs=300, batch_size=256,
        optimizer="lars", lr=0.2, lr_scaling="linear", momentum=0.9, weight_decay=1.5e-6, exclude_bias_norm=True,
        warmup_epochs=10, schedule="cosine", target_ema=0.996, target_ema_schedule="cosine", pred_hidden=4096,
        knn_every=10, final_probe_epochs=30, log_every=50, spectrum_every=500, keep_every=20,
    ),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "preset": tuple(PRESETS),
    "method": ("byol", "simsiam"),
    "predictor": PREDICTORS,
    "backend": ("auto", "torch", "triton"),
    "backbone": BACKBONES,
    "optimizer": OPTIMIZERS,
    "solver": ("jacobi", "orth"),
    "filter": FILTERS,
    "lr_scaling": ("none", "linear"),
    "schedule": SCHEDULES,
    "target_ema_schedule": SCHEDULES,
    "device": ("auto", "cpu", "cuda"),
    "progress": ("auto", "bar", "plain"),
    "resident": ("auto", "on", "off"),
    "pred_reg": ("none", "symmetric"),
    "loss": ("cosine", "iso"),
}


def _field_comments() -> dict[str, str]:
    """The trailing comment of each field above: the help text of its flag, written once. Read from this file's
    text, the class's lines only: inspect.getsource would parse the module with `ast` on every call, and CPython
    3.11's ast can be left raising SystemError ("recursion depth mismatch") in a process where a signal
    interrupted an earlier parse."""
    from pathlib import Path

    lines = Path(__file__).read_text().splitlines()
    start = lines.index("class Config:")
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace())
    out = {}
    for line in lines[start:end]:
        name, sep, rest = line.strip().partition(":")
        if sep and "#" in rest and name.isidentifier():
            out[name] = rest.split("#", 1)[1].strip()
    return out


def _base_type(tp) -> type:
    """int for `int`, str for `str | None`, and so on."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in p.items())}" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m fastpred.train",
        description="BYOL / SimSiam pretraining with DirectPred and its baselines. Every flag overrides the preset.",
        epilog=f"Presets: {presets}",
        argument_default=argparse.SUPPRESS,  # only flags actually given reach the config
    )
    hints = typing.get_type_hints(Config)
    comments = _field_comments()
    for f in dataclasses.fields(Config):
        tp = _base_type(hints[f.name])
        # argparse %-formats help texts: a literal "25%" in a comment would break --help.
        kwargs: dict[str, typing.Any] = {"help": comments.get(f.name, "").replace("%", "%%"), "dest": f.name}
        if tp is bool:
            kwargs.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs["type"] = tp
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        parser.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)
    return parser


def resolve(given: dict[str, typing.Any]) -> Config:
    """Defaults, then the preset, then `given` (the flags on the command line); checked."""
    preset = given.get("preset", Config.preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg = Config(**{**PRESETS[preset], **given, "preset": preset})
    if cfg.alpha is None:
        cfg.alpha = 1.0 if cfg.predictor == "directcopy" else 0.5
    check(cfg, given)
    return cfg


def check(cfg: Config, given: dict[str, typing.Any]) -> None:
    """Flags that do not apply and settings that cannot run, as one-line ConfigErrors."""
    for name in given:
        if name in _APPLIES:
            needs, applies = _APPLIES[name]
            if not applies(cfg):
                raise ConfigError(f"--{name.replace('_', '-')} applies only with {needs}")
    positive = ("epochs", "batch_size", "proj_hidden", "proj_dim", "pred_hidden", "resolution", "freq", "groups",
                "log_every", "knn_k", "synthetic_steps", "final_probe_epochs", "checkpoint_every")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "knn_every", "spectrum_every", "sweeps", "warmup_epochs", "weight_decay", "eps",
                 "resident_max_mb"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.batch_size < 2:
        raise ConfigError("--batch-size must be >= 2 (BatchNorm needs two samples)")
    if not 0 <= cfg.rho < 1:
        raise ConfigError(f"--rho must be in [0, 1), got {cfg.rho}")
    if cfg.filter != "power" and (cfg.predictor == "directcopy" or "alpha" in given):
        raise ConfigError(f"--filter {cfg.filter} takes no exponent: use it with --predictor directpred and no --alpha")
    if cfg.solver == "orth" and cfg.proj_dim // cfg.groups > 64:
        raise ConfigError(f"--solver orth needs --proj-dim / --groups <= 64, got {cfg.proj_dim // cfg.groups}")
    if not 0 < cfg.crop_scale <= 1:
        raise ConfigError(f"--crop-scale must be in (0, 1], got {cfg.crop_scale}")
    if not 0 <= cfg.target_ema <= 1:
        raise ConfigError(f"--target-ema must be in [0, 1], got {cfg.target_ema}")
    if cfg.lr <= 0 or cfg.alpha <= 0:
        raise ConfigError("--lr and --alpha must be > 0")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'fastpred[tensorboard]'")
    if cfg.dist_timeout <= 0:
        raise ConfigError(f"--dist-timeout must be > 0 minutes, got {cfg.dist_timeout}")
    if cfg.start_timeout <= 0:
        raise ConfigError(f"--start-timeout must be > 0 seconds, got {cfg.start_timeout}")
    if cfg.stop_within <= 0:
        raise ConfigError(f"--stop-within must be > 0 seconds, got {cfg.stop_within}")
    if cfg.pred_lr is not None and cfg.pred_lr <= 0:
        raise ConfigError(f"--pred-lr must be > 0, got {cfg.pred_lr}")
    if cfg.pred_wd is not None and cfg.pred_wd < 0:
        raise ConfigError(f"--pred-wd must be >= 0, got {cfg.pred_wd}")
    if cfg.uses_direct and cfg.proj_dim % cfg.groups:
        raise ConfigError(f"--groups {cfg.groups} does not divide --proj-dim {cfg.proj_dim}")
    if cfg.resume and cfg.out:
        raise ConfigError("--resume continues the run in its own folder; drop --out")
    if cfg.loss == "iso" and cfg.predictor == "none":
        raise ConfigError("--loss iso rescales the gradient through a predictor; it needs one (not --predictor none)")


def to_json(cfg: Config) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def from_json(text: str) -> Config:
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config.json has settings this version does not know: {', '.join(unknown)}")
    return Config(**data)


#: Settings a resumed run may change: they do not alter the trajectory. `resident` and `resident_max_mb` may switch
#: between FFCV and the device-resident views: the same batches and crop distribution, other crop values (as
#: `device` gives other float rounding), so the resumed trajectory is statistically the same, not bitwise.
RESUMABLE = frozenset({"workers", "threads", "tensorboard", "progress", "log_every", "device", "compile", "max_steps",
                       "knn_every", "final_probe", "final_probe_epochs", "checkpoint_every", "resume", "keep_every",
                       "auto_resume", "max_nonfinite_steps", "dist_timeout", "start_timeout", "stop_within",
                       "resident", "resident_max_mb"})

#: Settings an explicit --resume may change on purpose, recorded in the run folder (events.jsonl, config.json): a
#: lower lr rescues a diverged run from its last good checkpoint; batch_size keeps the global batch (and with it the
#: schedule) on another number of processes, which the trainer checks against the checkpoint.
RESCUE = frozenset({"lr", "batch_size"})


def resumed(saved: Config, given: dict[str, typing.Any]) -> Config:
    """The saved config with the flags given at `--resume`; a flag that would change the run is an error."""
    if "out" in given:
        raise ConfigError("--resume continues the run in its own folder; drop --out")
    for name, value in given.items():
        if name not in RESUMABLE | RESCUE and getattr(saved, name) != value:
            raise ConfigError(
                f"--{name.replace('_', '-')} {value} contradicts the run's config ({name}={getattr(saved, name)!r}); "
                "a resumed run keeps its settings"
            )
    if given.get("lr", saved.lr) <= 0:
        raise ConfigError("--lr must be > 0")
    if given.get("batch_size", saved.batch_size) < 2:
        raise ConfigError("--batch-size must be >= 2 (BatchNorm needs two samples)")
    return dataclasses.replace(saved, **{k: v for k, v in given.items() if k in RESUMABLE | RESCUE})


__all__ = ["Config", "ConfigError", "PRESETS", "build_parser", "resolve", "to_json", "from_json", "resumed",
           "check", "RESUMABLE", "RESCUE"]
