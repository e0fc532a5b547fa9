"""Triton kernel for the fused per-sample colour augmentation; launched by `fastpred.data.color_triton`.

`triton.jit` picks compiled or interpreted when this module is imported: CPU tensors run it only if
TRITON_INTERPRET=1 was set before that (the launcher says so otherwise), as for every fastpred kernel.
"""

import triton
import triton.language as tl


@triton.jit
def _gray(r, g, b):
    return r * 0.2989 + g * 0.587 + b * 0.114  # torchvision's weights


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _blend(r, g, b, f, o):
    # f * x + (1 - f) * other, clamped: torchvision's _blend in float
    return _clamp01(r * f + o * (1.0 - f)), _clamp01(g * f + o * (1.0 - f)), _clamp01(b * f + o * (1.0 - f))


@triton.jit
def _pick(i, c0, c1, c2, c3, c4, c5):
    c34 = tl.where(i == 3, c3, tl.where(i == 4, c4, c5))
    return tl.where(i == 0, c0, tl.where(i == 1, c1, tl.where(i == 2, c2, c34)))


@triton.jit
def _hue(r, g, b, shift):
    # RGB -> HSV -> rotate H -> RGB, with Pillow's (and torchvision's) formulas
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / tl.where(eqc, 1.0, maxc)
    crd = tl.where(eqc, 1.0, cr)
    rc = (maxc - r) / crd
    gc = (maxc - g) / crd
    bc = (maxc - b) / crd
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h / 6.0 + 1.0
    h = h - tl.floor(h)
    h = h + shift
    h = h - tl.floor(h)
    h6 = h * 6.0
    i = tl.floor(h6)
    f = h6 - i
    i = i - 6.0 * tl.floor(i / 6.0)
    p = _clamp01(maxc * (1.0 - s))
    q = _clamp01(maxc * (1.0 - s * f))
    t = _clamp01(maxc * (1.0 - s * (1.0 - f)))
    v = maxc
    return _pick(i, v, q, p, p, t, v), _pick(i, t, v, v, q, p, p), _pick(i, p, p, t, v, v, q)


@triton.jit
def _color_kernel(
    x_ptr, out_ptr,  # uint8 (N, 3, H, W), any strides -> float (N, 3, H, W), any strides
    b_ptr, c_ptr, s_ptr, h_ptr,  # (N,) fp32 brightness, contrast, saturation factors and hue shift
    order_ptr,  # (N, 4) int32: jitter op order (0 brightness, 1 contrast, 2 saturation, 3 hue)
    flags_ptr,  # (N,) int32: 1 jitter, 2 grayscale, 4 finish (solarize + normalise here), 8 solarize
    mean0, mean1, mean2, std0, std1, std2,
    H, W,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    BLOCK: tl.constexpr,  # pixels per tile; one program walks one whole image
):
    n = tl.program_id(0).to(tl.int64)
    flags = tl.load(flags_ptr + n)
    bf = tl.load(b_ptr + n)
    cf = tl.load(c_ptr + n)
    sf = tl.load(s_ptr + n)
    hf = tl.load(h_ptr + n)
    o0 = tl.load(order_ptr + n * 4)
    o1 = tl.load(order_ptr + n * 4 + 1)
    o2 = tl.load(order_ptr + n * 4 + 2)
    o3 = tl.load(order_ptr + n * 4 + 3)
    jitter = (flags & 1) != 0
    HW = H * W
    x_base = x_ptr + n * stride_xn
    o_base = out_ptr + n * stride_on

    # Pass 1: contrast blends towards the mean grey of the image as it is when contrast runs, i.e. after the ops
    # that precede it in this sample's order. The second read of the image in pass 2 is served from L2.
    pos_c = (o1 == 1).to(tl.int32) + 2 * (o2 == 1).to(tl.int32) + 3 * (o3 == 1).to(tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if jitter:
        for start in range(0, HW, BLOCK):
            pix = start + tl.arange(0, BLOCK)
            mask = pix < HW
            off = (pix // W) * stride_xh + (pix % W) * stride_xw
            r = tl.load(x_base + off, mask=mask, other=0).to(tl.float32) / 255.0
            g = tl.load(x_base + stride_xc + off, mask=mask, other=0).to(tl.float32) / 255.0
            b = tl.load(x_base + 2 * stride_xc + off, mask=mask, other=0).to(tl.float32) / 255.0
            for k in tl.static_range(3):
                op = tl.where(k == 0, o0, tl.where(k == 1, o1, o2))
                if k < pos_c:
                    if op == 0:
                        r, g, b = _clamp01(r * bf), _clamp01(g * bf), _clamp01(b * bf)
                    elif op == 2:
                        r, g, b = _blend(r, g, b, sf, _gray(r, g, b))
                    else:
                        r, g, b = _hue(r, g, b, hf)
            acc += tl.where(mask, _gray(r, g, b), 0.0)
    grey_mean = tl.sum(acc, axis=0) / HW

    # Pass 2: the whole chain, one write.
    for start in range(0, HW, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        mask = pix < HW
        row = pix // W
        col = pix % W
        off = row * stride_xh + col * stride_xw
        r = tl.load(x_base + off, mask=mask, other=0).to(tl.float32) / 255.0
        g = tl.load(x_base + stride_xc + off, mask=mask, other=0).to(tl.float32) / 255.0
        b = tl.load(x_base + 2 * stride_xc + off, mask=mask, other=0).to(tl.float32) / 255.0
        if jitter:
            for k in tl.static_range(4):
                op = tl.where(k == 0, o0, tl.where(k == 1, o1, tl.where(k == 2, o2, o3)))
                if op == 0:
                    r, g, b = _clamp01(r * bf), _clamp01(g * bf), _clamp01(b * bf)
                elif op == 1:
                    r, g, b = _blend(r, g, b, cf, grey_mean)
                elif op == 2:
                    r, g, b = _blend(r, g, b, sf, _gray(r, g, b))
                else:
                    r, g, b = _hue(r, g, b, hf)
        if (flags & 2) != 0:
            r = _gray(r, g, b)
            g = r
            b = r
        if (flags & 4) != 0:
            if (flags & 8) != 0:
                r = tl.where(r >= 0.5, 1.0 - r, r)
                g = tl.where(g >= 0.5, 1.0 - g, g)
                b = tl.where(b >= 0.5, 1.0 - b, b)
            r = (r - mean0) / std0
            g = (g - mean1) / std1
            b = (b - mean2) / std2
        o_off = row * stride_oh + col * stride_ow
        tl.store(o_base + o_off, r.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_base + stride_oc + o_off, g.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_base + 2 * stride_oc + o_off, b.to(out_ptr.dtype.element_ty), mask=mask)
