"""Per-sample BYOL augmentations against torchvision.transforms.v2 functional ops applied sample by sample."""

import pytest
import torch
from devices import needs_cuda, needs_interpreter, run_without_interpreter
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms.v2 import functional as TF

from fastpred.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BYOLAugment,
    ColorAugment,
    blur_kernel_size,
    byol_augment_batched,
    byol_augment_fused,
    byol_augment_ref,
    gaussian_blur_ref,
    sample_params,
    solarize_normalize_ref,
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


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
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


@needs_interpreter
def test_every_op_order_and_flag_combination():
    n = 48
    x = images(n, 12, 12, True, seed=3)
    p = sample_params(n, p_jitter=1.0, p_gray=0.0, p_blur=0.0, generator=torch.Generator().manual_seed(4))
    p["order"] = torch.tensor([list(o) for o in __import__("itertools").permutations(range(4))] * 2)
    expected = torch.stack([torchvision_one(x[i], p, i, 3) for i in range(n)])
    torch.testing.assert_close(byol_augment_ref(x, p), expected, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(byol_augment_fused(x, p), expected, atol=3e-5, rtol=1e-5)


def grey_images(n, h, w, channels_last, seed=0):
    """Three equal channels, as MNIST-like sets are stored: the batched path's one-channel case."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 256, (n, h, w, 1), dtype=torch.uint8, generator=g)
    v[:, : h // 3, : w // 3] = 200  # a flat patch: contrast's mean and the clamps
    v[:, -2:] = 255
    x = v.expand(-1, -1, -1, 3)
    return x.permute(0, 3, 1, 2) if channels_last else x.permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("kind", ["grey", "colour", "mixed"])
@pytest.mark.parametrize("n,h,w,channels_last", [(1, 16, 16, False), (7, 17, 23, True), (9, 28, 28, True)])
@pytest.mark.parametrize("view", [(1.0, 0.0), (0.5, 0.5)])
def test_batched_matches_the_reference(kind, n, h, w, channels_last, view):
    grey, colour = grey_images(n, h, w, channels_last, seed=n), images(n, h, w, channels_last, seed=n)
    x = {"grey": grey, "colour": colour, "mixed": torch.where((torch.arange(n) % 3 == 0).view(-1, 1, 1, 1),
                                                               grey, colour)}[kind]
    p = sample_params(n, p_blur=view[0], p_solarize=view[1], generator=torch.Generator().manual_seed(7 + n))
    out = byol_augment_batched(x, p)
    assert out.dtype == torch.float32 and out.shape == (n, 3, h, w)
    # Same ops in the same order per pixel: equal to the reference, not merely close.
    torch.testing.assert_close(out, byol_augment_ref(x, p), atol=1e-6, rtol=1e-6)


def test_batched_grey_every_op_order_against_torchvision():
    n = 48
    x = grey_images(n, 12, 12, True, seed=5)
    p = sample_params(n, p_jitter=1.0, p_gray=0.5, p_blur=0.5, p_solarize=0.5,
                      generator=torch.Generator().manual_seed(6))
    p["order"] = torch.tensor([list(o) for o in __import__("itertools").permutations(range(4))] * 2)
    expected = torch.stack([torchvision_one(x[i], p, i, 3) for i in range(n)])
    torch.testing.assert_close(byol_augment_batched(x, p), expected, atol=3e-5, rtol=1e-5)


def test_auto_backend_is_the_batched_path_on_the_cpu():
    x = grey_images(6, 20, 20, True, seed=2)
    p = sample_params(6, p_blur=0.5, generator=torch.Generator().manual_seed(3))
    ref = byol_augment_ref(x, p)
    for backend in ("auto", "batched", "torch"):
        torch.testing.assert_close(ColorAugment(backend=backend)(x, p), ref, atol=1e-6, rtol=1e-6)


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


@needs_cuda
def test_cuda_kernel_matches_reference():
    x = images(64, 224, 224, True).cuda()
    p = sample_params(64, p_blur=0.5, p_solarize=0.5, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(byol_augment_fused(x, p), byol_augment_ref(x, p), atol=3e-5, rtol=1e-5)


@needs_cuda
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


class _HostData(TorchDispatchMode):
    """Records ops that make a tensor from Python data (`aten.lift_fresh`): on CUDA, a blocking host-to-device copy."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "lift_fresh" in str(func):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_blur_pass_makes_no_tensor_from_host_data():
    # The fused path's second pass (blur, solarize, normalise) runs every step on CUDA: a tensor built from the
    # mean/std tuples there would wait on the host (the CUDA test above shows it under sync debug mode "error").
    x = images(3, 16, 16, True).float() / 255.0
    p = sample_params(3, p_solarize=0.5, generator=torch.Generator().manual_seed(1))
    with _HostData() as seen:
        y = solarize_normalize_ref(gaussian_blur_ref(x, p["sigma"], 5), p["solarize"], IMAGENET_MEAN, IMAGENET_STD)
    assert seen.ops == []
    expected = torch.stack([torchvision_one_finish(x[i], p, i) for i in range(3)])
    torch.testing.assert_close(y, expected, atol=3e-5, rtol=1e-5)


def torchvision_one_finish(img: torch.Tensor, p: dict, i: int) -> torch.Tensor:
    s = float(p["sigma"][i])
    img = TF.gaussian_blur(img, [5, 5], [s, s])
    if p["solarize"][i]:
        img = TF.solarize(img, 0.5)
    return TF.normalize(img, IMAGENET_MEAN, IMAGENET_STD)


TRITON_REFUSED_WITHOUT_INTERPRETER = """
import torch
from fastpred.data.augment import ColorAugment
x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
try:
    ColorAugment(backend="triton")(x)
    raise SystemExit("backend='triton' ran on CPU tensors without the interpreter")
except ValueError as e:
    assert "TRITON_INTERPRET=1" in str(e) and "\\n" not in str(e), e
print(tuple(ColorAugment()(x).shape))  # "auto" is the batched torch path on the CPU
"""


def test_triton_backend_on_cpu_needs_the_interpreter():
    # One policy for every kernel of fastpred: nothing switches TRITON_INTERPRET; without it, one ValueError line.
    assert run_without_interpreter(TRITON_REFUSED_WITHOUT_INTERPRETER).strip() == "(2, 3, 8, 8)"
