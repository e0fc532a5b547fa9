"""Per-sample BYOL augmentations against torchvision.transforms.v2 functional ops applied sample by sample."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fastpred.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BYOLAugment,
    blur_kernel_size,
    byol_augment_fused,
    byol_augment_ref,
    sample_params,
)

JITTER_OPS = (
    lambda img, p, i: TF.adjust_brightness(img, float(p["b"][i])),
    lambda img, p, i: TF.adjust_contrast(img, float(p["c"][i])),
    lambda img, p, i: TF.adjust_saturation(img, float(p["s"][i])),
    lambda img, p, i: TF.adjust_hue(img, float(p["h"][i])),
)


def torchvision_one(img: torch.Tensor, p: dict, i: int, kernel_size: int) -> torch.Tensor:
    img = img.float() / 255.0
    if p["jitter"][i]:
        for op in p["order"][i].tolist():
            img = JITTER_OPS[op](img, p, i)
    if p["gray"][i]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p["blur"][i]:
        s = float(p["sigma"][i])
        img = TF.gaussian_blur(img, [kernel_size, kernel_size], [s, s])
    if p["solarize"][i]:
        img = TF.solarize(img, 0.5)
    return TF.normalize(img, IMAGENET_MEAN, IMAGENET_STD)


def images(n, h, w, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    # Flat patches and saturated pixels exercise hue's max == min branch and the clamps.
    x[:, : h // 3, : w // 3] = 200
    x[:, -2:, :, 0] = 255
    return x.permute(0, 3, 1, 2) if channels_last else x.permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,h,w,channels_last", [(1, 16, 16, False), (7, 17, 23, True), (12, 32, 32, True)])
def test_matches_torchvision_per_sample(backend, n, h, w, channels_last):
    x = images(n, h, w, channels_last, seed=n)
    g = torch.Generator().manual_seed(100 + n)
    # Probabilities of 1/2 give every combination of flags across the batch.
    p = sample_params(n, p_jitter=0.7, p_gray=0.3, p_blur=0.5, p_solarize=0.5, generator=g)
    ks = blur_kernel_size(h, w)
    fn = byol_augment_ref if backend == "torch" else byol_augment_fused
    out = fn(x, p)
    assert out.dtype == torch.float32 and out.shape == (n, 3, h, w)
    expected = torch.stack([torchvision_one(x[i], p, i, ks) for i in range(n)])
    torch.testing.assert_close(out, expected, atol=3e-5, rtol=1e-5)


def test_every_op_order_and_flag_combination():
    n = 48
    x = images(n, 12, 12, True, seed=3)
    p = sample_params(n, p_jitter=1.0, p_gray=0.0, p_blur=0.0, generator=torch.Generator().manual_seed(4))
    p["order"] = torch.tensor([list(o) for o in __import__("itertools").permutations(range(4))] * 2)
    expected = torch.stack([torchvision_one(x[i], p, i, 3) for i in range(n)])
    torch.testing.assert_close(byol_augment_ref(x, p), expected, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(byol_augment_fused(x, p), expected, atol=3e-5, rtol=1e-5)


def test_params_are_per_sample_with_requested_rates():
    n = 4000
    g = torch.Generator().manual_seed(0)
    p = sample_params(n, p_jitter=0.8, p_gray=0.2, p_blur=0.1, p_solarize=0.2, generator=g)
    for key, rate in [("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solarize", 0.2)]:
        assert abs(p[key].float().mean().item() - rate) < 0.03, key
    assert p["b"].min() >= 0.6 and p["b"].max() <= 1.4 and p["h"].abs().max() <= 0.1
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    assert len(torch.unique(p["b"])) > 0.99 * n  # one draw per image, not per batch
    assert (torch.sort(p["order"], dim=1).values == torch.arange(4)).all()
    assert len({tuple(o) for o in p["order"].tolist()}) == 24


def test_byol_module_is_asymmetric_and_runs():
    aug = BYOLAugment(backend="torch")
    assert (aug.view1.p_blur, aug.view1.p_solarize, aug.view2.p_blur, aug.view2.p_solarize) == (1.0, 0.0, 0.1, 0.2)
    assert "p_jitter=0.8" in repr(aug)
    x = images(4, 24, 24, True)
    y1, y2 = aug(x, x)
    assert y1.shape == y2.shape == (4, 3, 24, 24) and torch.isfinite(y1).all() and torch.isfinite(y2).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_reference():
    x = images(64, 224, 224, True).cuda()
    p = sample_params(64, p_blur=0.5, p_solarize=0.5, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(byol_augment_fused(x, p), byol_augment_ref(x, p), atol=3e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_augmentation_never_waits_on_the_host():
    aug = BYOLAugment().cuda()
    x = images(32, 64, 64, True).cuda()
    aug(x, x)  # first call: kernel compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y1, y2 = aug(x, x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(y1).all() and torch.isfinite(y2).all()
