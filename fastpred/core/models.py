"""Backbones, the projector and the predictor heads of the trainer, built by name.

Every backbone maps float images (B, 3, H, W) to features (B, feat_dim). The ResNets are the
torchvision modules themselves (only ``fc`` and, for the small-image variant, the stem replaced), so a
backbone's ``state_dict`` loads into a plain ``torchvision.models.resnet50()`` with ``fc = nn.Identity()``
and the weights leave this package without any key renaming.
"""

from __future__ import annotations

from torch import nn

from fastpred.direct import DirectPredictor
from fastpred.trained import LinearPredictor, MLPPredictor, OffDiagonalPredictor

BACKBONES = ("small_cnn", "small_cnn_wide", "small_cnn_512", "small_cnn_1024", "resnet18_small", "resnet18", "resnet50")
PREDICTORS = ("directpred", "directcopy", "linear", "mlp", "offdiag", "none")

#: Widths of the small CNNs' conv blocks; the last one is the feature dimension.
_SMALL_CNN_WIDTHS = {"small_cnn": (32, 64, 128, 128), "small_cnn_wide": (32, 64, 128, 256),
                     "small_cnn_512": (32, 64, 128, 512), "small_cnn_1024": (32, 64, 128, 1024)}


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """Returns ``(backbone, feat_dim)`` for a backbone name in ``BACKBONES``.

    - ``small_cnn``: four 3x3 stride-2 conv-BatchNorm-ReLU blocks (32-64-128-128) and a global average
      pool: 128 features, sized so a CPU run on 32x32 digits is quick.
    - ``small_cnn_wide``: the same with a last block of 256 (32-64-128-256): 256 features for about the same
      time (its last block runs at 2x2 at 28 px).
    - ``small_cnn_512``, ``small_cnn_1024``: a last block of 512 or 1024 (32-64-128-512, 32-64-128-1024): as
      many features, for 1.3x or 1.9x ``small_cnn_wide``'s training-step time at 28 px (two CPU cores);
      ``small_cnn_1024`` is the fashion-mnist preset's backbone.
    - ``resnet18_small``: torchvision's resnet18 with a 3x3 stride-1 stem and no max-pool (the official
      DirectPred CIFAR-10 / STL-10 configuration); 512 features.
    - ``resnet18``, ``resnet50``: torchvision's ImageNet models, randomly initialised; 512 / 2048 features.
    """
    if name in _SMALL_CNN_WIDTHS:
        widths = _SMALL_CNN_WIDTHS[name]
        return _small_cnn(widths), widths[-1]
    if name in ("resnet18_small", "resnet18", "resnet50"):
        # Imported here: torchvision is a trainer dependency, not one of `import fastpred`.
        import torchvision

        model = torchvision.models.resnet50() if name == "resnet50" else torchvision.models.resnet18()
        feat_dim = model.fc.in_features
        model.fc = nn.Identity()
        if name == "resnet18_small":
            # 32-96 px images would lose 4x resolution to the ImageNet stem (7x7 stride 2, then max-pool).
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model, feat_dim
    raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")


def _small_cnn(widths: tuple[int, ...]) -> nn.Sequential:
    # Every block halves the resolution: at 32x32 the widest layers run at 4x4 and 2x2, so batch 256
    # forward+backward costs ~0.1 s of one CPU core (channels_last; ~0.13 s NCHW), while the last
    # block still sees the whole 32 px image (receptive field 31 px). A stride-1 stem costs ~4x more.
    layers: list[nn.Module] = []
    in_ch = 3
    for out_ch in widths:
        layers += [
            nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
        in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def build_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """BYOL's projector: Linear(in_dim, hidden) - BatchNorm1d - ReLU - Linear(hidden, out_dim)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def build_predictor(
    kind: str,
    dim: int,
    *,
    rho: float = 0.3,
    eps: float = 0.1,
    freq: int = 1,
    groups: int = 1,
    backend: str = "auto",
    sweeps: int = 6,
    solver: str = "jacobi",
    trainable: bool = False,
    hidden: int = 512,
    alpha: float | None = None,
    filter: str = "power",
    filter_scale: float | None = None,
) -> nn.Module | None:
    """The predictor head for a kind in ``PREDICTORS``, mapping (N, dim) -> (N, dim); ``None`` for ``"none"``.

    - ``directpred``: ``DirectPredictor`` with ``alpha`` (0.5, the paper's DirectPred, unless given).
    - ``directcopy``: ``DirectPredictor`` with alpha = 1 (W = F / max s + eps I); another ``alpha`` is an error.
    - ``linear``, ``mlp`` (BYOL's head with ``hidden`` units), ``offdiag`` (Wen & Li's I + A_off): trained heads.
    - ``none``: no predictor (the loss compares projections directly).

    ``rho``, ``eps``, ``freq``, ``groups``, ``backend``, ``sweeps``, ``solver``, ``trainable``, ``filter`` and
    ``filter_scale`` (passed on for the log filters only) are DirectPredictor's arguments (see its docstring) and
    ``hidden`` is MLPPredictor's; kinds that do not take one ignore it, so a config can pass all of them whatever
    the kind.
    """
    if kind in ("directpred", "directcopy"):
        if kind == "directcopy":
            if alpha not in (None, 1, 1.0):
                raise ValueError(f"directcopy is DirectPredictor with alpha=1; got alpha={alpha!r}")
            alpha = 1.0
        return DirectPredictor(
            dim,
            rho=rho,
            eps=eps,
            alpha=0.5 if alpha is None else alpha,
            freq=freq,
            trainable=trainable,
            groups=groups,
            backend=backend,
            sweeps=sweeps,
            solver=solver,
            filter=filter,
            filter_scale=filter_scale if filter != "power" else None,
        )
    if kind == "linear":
        return LinearPredictor(dim)
    if kind == "mlp":
        return MLPPredictor(dim, hidden)
    if kind == "offdiag":
        return OffDiagonalPredictor(dim)
    if kind == "none":
        return None
    raise ValueError(f"unknown predictor {kind!r}; valid: {', '.join(PREDICTORS)}")
