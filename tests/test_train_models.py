"""fastpred.core.models: backbones, projector and predictors built by name."""

import pytest
import torch
import torchvision
from torch import nn

from fastpred import DirectPredictor, LinearPredictor, MLPPredictor, OffDiagonalPredictor
from fastpred.core.models import BACKBONES, PREDICTORS, build_backbone, build_predictor, build_projector

FEAT_DIMS = {"small_cnn": 128, "small_cnn_wide": 256, "small_cnn_512": 512, "small_cnn_1024": 1024,
             "resnet18_small": 512, "resnet18": 512, "resnet50": 2048}


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_maps_images_to_features(name):
    torch.manual_seed(0)
    backbone, feat_dim = build_backbone(name)
    assert feat_dim == FEAT_DIMS[name]
    x = torch.randn(2, 3, 32, 32)
    out = backbone(x)
    assert out.shape == (2, feat_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_backbone_sizes_other_resolutions_and_trains():
    torch.manual_seed(0)
    backbone, feat_dim = build_backbone("small_cnn")
    for size in (16, 64):
        assert backbone(torch.randn(4, 3, size, size)).shape == (4, feat_dim)
    backbone(torch.randn(4, 3, 32, 32)).square().sum().backward()
    first_conv = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def _torchvision_reference(name: str) -> nn.Module:
    model = torchvision.models.resnet50() if name == "resnet50" else torchvision.models.resnet18()
    model.fc = nn.Identity()
    if name == "resnet18_small":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


@pytest.mark.parametrize("name", ["resnet18_small", "resnet18", "resnet50"])
def test_resnet_state_dict_loads_into_plain_torchvision(name):
    torch.manual_seed(0)
    backbone, _ = build_backbone(name)
    reference = _torchvision_reference(name)
    # strict: the same keys, no prefix, and the same shapes (a 7x7 stem would not load into a 3x3 one).
    reference.load_state_dict(backbone.state_dict(), strict=True)
    if name != "resnet50":  # keep the test fast; resnet50's keys and shapes are what strict checks
        backbone.eval(), reference.eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(reference(x), backbone(x), rtol=0, atol=0)


def test_small_stem_keeps_resolution():
    # The small-image stem must not downsample: at 32 px, layer1 sees 32x32, not 8x8.
    backbone, _ = build_backbone("resnet18_small")
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = output.shape  # returns None: the hook must not replace the output

    backbone.layer1.register_forward_hook(record)
    backbone.eval()
    with torch.no_grad():
        backbone(torch.randn(1, 3, 32, 32))
    assert seen["shape"][-2:] == (32, 32)
    assert isinstance(backbone.maxpool, nn.Identity) and backbone.conv1.kernel_size == (3, 3)


def test_unknown_backbone_is_one_line_listing_names():
    with pytest.raises(ValueError) as info:
        build_backbone("vgg16")
    message = str(info.value)
    assert "\n" not in message and "vgg16" in message
    assert all(name in message for name in BACKBONES)


def test_projector_is_byol_mlp():
    torch.manual_seed(0)
    projector = build_projector(128, 64, 32)
    kinds = [type(m) for m in projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (projector[0].in_features, projector[0].out_features) == (128, 64)
    assert (projector[3].in_features, projector[3].out_features) == (64, 32)
    assert projector(torch.randn(5, 128)).shape == (5, 32)


def test_predictor_kinds():
    assert PREDICTORS == ("directpred", "directcopy", "linear", "mlp", "offdiag", "none")
    direct = build_predictor("directpred", 16, rho=0.5, eps=0.2, freq=3, groups=2, backend="torch", sweeps=4,
                             solver="orth")
    assert isinstance(direct, DirectPredictor)
    assert (direct.alpha, direct.rho, direct.eps, direct.freq, direct.groups) == (0.5, 0.5, 0.2, 3, 2)
    assert (direct.backend, direct.sweeps, direct.solver, direct.trainable) == ("torch", 4, "orth", False)
    assert build_predictor("directpred", 16, alpha=0.25).alpha == 0.25
    assert isinstance(build_predictor("directpred", 16, trainable=True).W, nn.Parameter)
    copy = build_predictor("directcopy", 16)
    assert isinstance(copy, DirectPredictor) and copy.alpha == 1.0
    assert isinstance(build_predictor("linear", 16), LinearPredictor)
    mlp = build_predictor("mlp", 16, hidden=24)
    assert isinstance(mlp, MLPPredictor) and mlp.hidden == 24
    assert isinstance(build_predictor("offdiag", 16), OffDiagonalPredictor)
    assert build_predictor("none", 16) is None
    for kind in PREDICTORS[:-1]:
        head = build_predictor(kind, 16, hidden=8)
        assert head(torch.randn(4, 16)).shape == (4, 16)


def test_predictor_errors():
    with pytest.raises(ValueError, match="alpha"):
        build_predictor("directcopy", 16, alpha=0.5)
    with pytest.raises(ValueError) as info:
        build_predictor("byol", 16)
    message = str(info.value)
    assert "\n" not in message and all(kind in message for kind in PREDICTORS)
