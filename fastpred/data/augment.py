"""BYOL's image augmentations on batches, with random parameters drawn per sample.

torchvision's batch transforms draw one set of parameters per call, i.e. per batch; BYOL needs them per image.
Here `sample_params` draws them per image, the torch reference applies them vectorised over the batch (the test
oracle), `byol_augment_batched` gives the same result faster on the CPU (grey images on one channel), and on
CUDA the colour ops (jitter in per-sample random order, grayscale, and, for
images without blur, solarize + normalise) run as one fused Triton kernel: one read of uint8, one float write.
Semantics are those of torchvision.transforms.v2 functional ops on float images in [0, 1].

Symbols per sample: b, c, s (brightness, contrast, saturation factors), h (hue shift), order (a permutation of
the four jitter ops: 0 brightness, 1 contrast, 2 saturation, 3 hue), sigma (blur), and the apply flags.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def sample_params(
    n: int,
    *,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    p_jitter: float = 0.8,
    p_gray: float = 0.2,
    p_blur: float = 1.0,
    sigma: tuple[float, float] = (0.1, 2.0),
    p_solarize: float = 0.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample parameters, as torchvision's RandomApply(ColorJitter), RandomGrayscale, GaussianBlur and
    RandomSolarize would draw them for each image. All tensors have leading dim n and live on `device`."""
    kw = {"device": device, "generator": generator}

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, **kw) * (hi - lo) + lo

    return {
        "jitter": torch.rand(n, **kw) < p_jitter,
        "b": u(max(0.0, 1 - brightness), 1 + brightness),
        "c": u(max(0.0, 1 - contrast), 1 + contrast),
        "s": u(max(0.0, 1 - saturation), 1 + saturation),
        "h": u(-hue, hue),
        "order": torch.argsort(torch.rand(n, 4, **kw), dim=1),  # (n, 4): a random permutation per sample
        "gray": torch.rand(n, **kw) < p_gray,
        "blur": torch.rand(n, **kw) < p_blur,
        "sigma": u(*sigma),
        "solarize": torch.rand(n, **kw) < p_solarize,
    }


def blur_kernel_size(height: int, width: int) -> int:
    """BYOL blurs with a kernel of ~10% of the image side (23 at 224), odd, at least 3."""
    k = int(0.1 * min(height, width))
    return max(3, k + 1 - k % 2)


# ---- torch reference: vectorised over the batch, per-sample parameters -------------------------------------


def _gray(x: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) -> (n, 1, H, W)
    return (x[:, 0] * GRAY[0] + x[:, 1] * GRAY[1] + x[:, 2] * GRAY[2]).unsqueeze(1)


def _col(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_hue_ref(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Hue rotation through HSV, as torchvision (Pillow's formulas), with a per-sample shift h: (n,)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(eqc, torch.ones_like(maxc), maxc)
    crd = torch.where(eqc, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hh = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hh = torch.remainder(torch.remainder(hh / 6.0 + 1.0, 1.0) + h.view(-1, 1, 1), 1.0)
    v = maxc
    h6 = hh * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6.0)
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)

    def pick(c0, c1, c2, c3, c4, c5):
        return torch.where(i == 0, c0, torch.where(i == 1, c1, torch.where(i == 2, c2, torch.where(
            i == 3, c3, torch.where(i == 4, c4, c5)))))

    return torch.stack((pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)), dim=1)


def _jitter_op(x: torch.Tensor, op: int, p: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    if op == BRIGHTNESS:
        return (x * _col(p["b"][idx])).clamp(0.0, 1.0)
    if op == CONTRAST:
        c = _col(p["c"][idx])
        return (c * x + (1.0 - c) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp(0.0, 1.0)
    if op == SATURATION:
        s = _col(p["s"][idx])
        return (s * x + (1.0 - s) * _gray(x)).clamp(0.0, 1.0)
    return adjust_hue_ref(x, p["h"][idx])


def color_ref(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour jitter (per-sample random op order) then grayscale, on float (n, 3, H, W) in [0, 1]."""
    x = x.clone()
    jit = p["jitter"]
    for k in range(4):
        for op in range(4):
            idx = torch.nonzero(jit & (p["order"][:, k] == op)).flatten()
            if len(idx):
                x[idx] = _jitter_op(x[idx], op, p, idx)
    return torch.where(_col(p["gray"]), _gray(x).expand_as(x), x)


def gaussian_blur_ref(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma: (n,), reflect padding (torchvision's choices)."""
    n, ch, hgt, wid = x.shape
    half = kernel_size // 2
    k = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    w = torch.softmax(-(k**2) / (2 * sigma.to(x.dtype).view(-1, 1) ** 2), dim=1)  # (n, K), sums to 1
    w = w.repeat_interleave(ch, dim=0)  # one kernel per (sample, channel) group
    y = F.pad(x.reshape(1, n * ch, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, w.view(n * ch, 1, 1, kernel_size), groups=n * ch)
    y = F.conv2d(y, w.view(n * ch, 1, kernel_size, 1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


def normalize_ref(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel of float (n, 3, H, W). mean and std stay Python floats: a tensor made from
    them would be a blocking host-to-device copy on every call on CUDA."""
    return torch.stack([(x[:, c] - float(mean[c])) / float(std[c]) for c in range(3)], dim=1)


_MEAN_255 = tuple(255 * m for m in IMAGENET_MEAN)  # the training views' normalisation, on uint8 values
_STD_255 = tuple(255 * s for s in IMAGENET_STD)


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised like the training views, without augmentation: the preprocessing
    of the probes and of `python -m fastpred.eval`."""
    return normalize_ref(x.float(), _MEAN_255, _STD_255)


def solarize_normalize_ref(x: torch.Tensor, solarize: torch.Tensor, mean, std) -> torch.Tensor:
    """Per-sample solarize, then `normalize_ref`."""
    return normalize_ref(_solarize(x, solarize), mean, std)


def _solarize(x: torch.Tensor, solarize: torch.Tensor) -> torch.Tensor:
    return torch.where(_col(solarize) & (x >= 0.5), 1.0 - x, x)


def byol_augment_ref(
    x: torch.Tensor,
    p: dict[str, torch.Tensor],
    *,
    kernel_size: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> normalised float32: jitter, grayscale, blur, solarize, normalise, per sample."""
    assert x.dim() == 4 and x.shape[1] == 3 and x.dtype == torch.uint8, (x.shape, x.dtype)
    y = color_ref(x.float() / 255.0, p)
    idx = torch.nonzero(p["blur"]).flatten()
    if len(idx):
        ks = kernel_size or blur_kernel_size(*x.shape[-2:])
        y[idx] = gaussian_blur_ref(y[idx], p["sigma"][idx], ks)
    return solarize_normalize_ref(y, p["solarize"], mean, std)


# ---- batched path: the CPU's fast path, same per-sample semantics ----------------------------------------
#
# Grey images (R = G = B everywhere: all of MNIST-like data) stay grey through every op, so they are augmented
# on one channel with the same arithmetic per pixel: a third of the work, and hue, which maps a grey pixel to
# itself exactly, is skipped. Their jitter needs no index/scatter per (position, op) pair as the reference's
# does: brightness, contrast and saturation are one blend y = clamp(a x + (1 - a) r) with a per-sample factor a
# and reference r (0, the grey mean, the grey image), one pass per op position over the whole batch, in which a
# sample whose op there is hue (or that is not jittered) takes a = 1: 1 * x + 0 * r is x exactly, bit for bit.
# Colour images take the reference's jitter: with hue on a third of them per position, the blend was not faster.


def _grey_jitter(v: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour jitter in per-sample op order on grey images as one channel, float (n, 1, H, W) in [0, 1]."""
    one = torch.ones_like(p["b"])
    for k in range(4):
        op = torch.where(p["jitter"], p["order"][:, k], -1)  # -1: no jitter; hue (3) is the identity on grey
        a = torch.where(op == BRIGHTNESS, p["b"], torch.where(op == CONTRAST, p["c"],
                                                                 torch.where(op == SATURATION, p["s"], one)))
        g = _gray(v.expand(-1, 3, -1, -1))  # v * w0 + v * w1 + v * w2, as the reference computes it per pixel
        r = torch.where(_col(op == SATURATION), g, _col(op == CONTRAST) * g.mean((1, 2, 3), keepdim=True))
        v = (_col(a) * v + (1.0 - _col(a)) * r).clamp_(0.0, 1.0)
    return torch.where(_col(p["gray"]), _gray(v.expand(-1, 3, -1, -1)), v)


def _augment_batched(x: torch.Tensor, p: dict[str, torch.Tensor], kernel_size: int) -> torch.Tensor:
    """uint8 (n, C, H, W) -> float in [0, 1] after jitter, grayscale, blur and solarize (normalisation apart);
    C = 1: grey images on one channel, C = 3: colour images through the reference's jitter."""
    y = x.float() / 255.0
    y = _grey_jitter(y, p) if x.shape[1] == 1 else color_ref(y, p)
    idx = torch.nonzero(p["blur"]).flatten()  # the CPU's host read costs nothing
    if len(idx) == len(y):
        y = gaussian_blur_ref(y, p["sigma"], kernel_size)
    elif len(idx):
        y = y.index_copy(0, idx, gaussian_blur_ref(y[idx], p["sigma"][idx], kernel_size))
    return _solarize(y, p["solarize"])


def byol_augment_batched(
    x: torch.Tensor,
    p: dict[str, torch.Tensor],
    *,
    kernel_size: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> torch.Tensor:
    """Same result as `byol_augment_ref` (the same float ops per pixel), faster on the CPU: grey images on one
    channel with their jitter as one blend per op position (above), normalisation in one pass with per-channel
    tensors. Reads the host (which samples are grey, the blur subset): the CPU's path, not CUDA's."""
    assert x.dim() == 4 and x.shape[1] == 3 and x.dtype == torch.uint8, (x.shape, x.dtype)
    ks = kernel_size or blur_kernel_size(*x.shape[-2:])
    grey = ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(1)  # (n,)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)  # the CPU: no host-to-device copy to avoid
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    if bool(grey.all()):
        return (_augment_batched(x[:, :1], p, ks) - m) / s  # (n, 1, H, W) broadcast to three channels
    if not bool(grey.any()):
        return (_augment_batched(x, p, ks) - m) / s
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for subset, c in ((grey, 1), (~grey, 3)):
        idx = torch.nonzero(subset).flatten()
        y = _augment_batched(x[idx, :c], {k: v[idx] for k, v in p.items()}, ks)
        out.index_copy_(0, idx, ((y - m) / s).expand(-1, 3, -1, -1))
    return out


# ---- fused path -------------------------------------------------------------------------------------------


def byol_augment_fused(
    x: torch.Tensor,
    p: dict[str, torch.Tensor],
    *,
    kernel_size: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    may_blur: bool = True,
) -> torch.Tensor:
    """Same result as `byol_augment_ref`, without a host sync; the colour ops, solarize and normalisation of
    unblurred images run in one Triton kernel. Blur, then solarize + normalise, runs as a second pass over the
    whole batch and is kept where p["blur"] is set: selecting the blurred subset first would need its size on
    the host. may_blur=False (p_blur = 0) skips that pass."""
    from fastpred.data.color_triton import color_jitter

    y = color_jitter(x, p, mean, std, finish=~p["blur"])
    if may_blur:
        ks = kernel_size or blur_kernel_size(*x.shape[-2:])
        blurred = solarize_normalize_ref(gaussian_blur_ref(y, p["sigma"], ks), p["solarize"], mean, std)
        y = torch.where(_col(p["blur"]), blurred, y)
    return y


class ColorAugment(nn.Module):
    """One view's BYOL augmentation after cropping: uint8 (n, 3, H, W) -> normalised float32 (n, 3, H, W).

    Every probability and range is a public attribute; parameters are drawn per sample on the input's device.
    backend: 'torch' (reference, any device), 'batched' (`byol_augment_batched`: the same result, faster on the
    CPU, host reads), 'triton' (fused colour kernel; CUDA, or CPU tensors when TRITON_INTERPRET=1 was set before
    triton was imported, a ValueError otherwise), or 'auto' (triton on CUDA, batched elsewhere).
    """

    def __init__(
        self,
        *,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        p_jitter: float = 0.8,
        p_gray: float = 0.2,
        p_blur: float = 1.0,
        sigma: tuple[float, float] = (0.1, 2.0),
        p_solarize: float = 0.0,
        kernel_size: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        backend: str = "auto",
    ):
        super().__init__()
        assert backend in ("auto", "torch", "batched", "triton"), backend
        assert 0 <= hue <= 0.5 and sigma[0] > 0, (hue, sigma)
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.p_jitter, self.p_gray, self.p_blur = p_jitter, p_gray, p_blur
        self.sigma, self.p_solarize = sigma, p_solarize
        self.kernel_size, self.mean, self.std, self.backend = kernel_size, tuple(mean), tuple(std), backend

    def sample(self, n: int, device=None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return sample_params(
            n, brightness=self.brightness, contrast=self.contrast, saturation=self.saturation, hue=self.hue,
            p_jitter=self.p_jitter, p_gray=self.p_gray, p_blur=self.p_blur, sigma=self.sigma,
            p_solarize=self.p_solarize, device=device, generator=generator,
        )

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        p = params if params is not None else self.sample(len(x), x.device)
        use_triton = self.backend == "triton" or (self.backend == "auto" and x.is_cuda)
        if use_triton:
            return byol_augment_fused(
                x, p, kernel_size=self.kernel_size, mean=self.mean, std=self.std, may_blur=self.p_blur > 0
            )
        fn = byol_augment_ref if self.backend == "torch" else byol_augment_batched
        return fn(x, p, kernel_size=self.kernel_size, mean=self.mean, std=self.std)

    def extra_repr(self) -> str:
        return (
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, hue={self.hue}, "
            f"p_jitter={self.p_jitter}, p_gray={self.p_gray}, p_blur={self.p_blur}, sigma={self.sigma}, "
            f"p_solarize={self.p_solarize}, backend={self.backend!r}"
        )


class BYOLAugment(nn.Module):
    """BYOL's asymmetric pair (Grill et al. 2020, table 6): blur p = 1.0 / 0.1, solarize p = 0.0 / 0.2.
    `forward(x1, x2)` returns the two augmented, normalised views; `view1` / `view2` expose every parameter."""

    def __init__(self, backend: str = "auto", **shared):
        super().__init__()
        self.view1 = ColorAugment(p_blur=1.0, p_solarize=0.0, backend=backend, **shared)
        self.view2 = ColorAugment(p_blur=0.1, p_solarize=0.2, backend=backend, **shared)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(x1), self.view2(x2)
