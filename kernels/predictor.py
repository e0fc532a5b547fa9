"""Construction of the DirectPred predictor W from the feature statistics (DESIGN.md, numerical contract).

    q = clamp(s, min=0) / max(s),   p = max(q ** alpha + eps, floor),   W = U diag(p) U^T

or, with a log filter g of sigma = sqrt(scale * clamp(s, 0)) (Zhuo et al. 2023; `_common.FILTERS`),
p = max(g(sigma) / g(sigma_max) + eps, floor).

- `predictor_from_eigh`: from an eigendecomposition (s, U), fused: p in-kernel, symmetric product,
  and a device-side decision to leave `out` untouched when max(s) <= 0 or anything is non-finite.
- `predictor_newton_schulz`: alpha = 1/2 without an eigendecomposition (matmul-only square root).
- `largest_eigenvalue`: power iteration on a repeated square; with it DirectCopy (alpha = 1) is W = F / max(s) + eps I.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FILTERS, filter_weights
from ._launch import check_grid, full_fp32_matmul, launch_device
from ._tiles import upper_tile

__all__ = [
    "predictor_from_eigh",
    "predictor_from_eigh_ref",
    "predictor_newton_schulz",
    "predictor_newton_schulz_ref",
    "largest_eigenvalue",
    "largest_eigenvalue_ref",
]


@triton.jit
def _rows_finite_kernel(
    U_ptr, bad_ptr,
    n,
    stride_ub, stride_ur, stride_uc,
    BLOCK_R: tl.constexpr,  # rows of U per program
    BLOCK_C: tl.constexpr,  # columns per step
):
    # bad[b, chunk] = 1 if rows [chunk * BLOCK_R, ...) of U[b] hold a non-finite value.
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    bad = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    for c0 in range(0, n, BLOCK_C):
        m = (rows[:, None] < n) & (c0 + cols[None, :] < n)
        u = tl.load(U_ptr + b * stride_ub + rows[:, None] * stride_ur + (c0 + cols[None, :]) * stride_uc,
                    mask=m, other=0.0)
        bad = tl.maximum(bad, ((u - u) != 0.0).to(tl.int32))  # x - x is NaN exactly for inf and NaN
    tl.store(bad_ptr + b * tl.num_programs(0) + chunk, tl.max(tl.max(bad, axis=1), axis=0).to(tl.int8))


@triton.jit
def _log1p(x):
    # log(1 + x) to fp32 accuracy for small x (1 + x alone loses x's low bits): log(u) * x / (u - 1), u = 1 + x
    # (Goldberg); the ratio x / (u - 1) corrects the rounding of u. Exact 0 at x = 0.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _log_filter(s, scale, FILTER: tl.constexpr):
    # g of sigma = sqrt(scale * clamp(s, 0)) as in `_common.filter_weights`: 1 log sigma, 2 log(1 + sigma),
    # 3 log(1 + sigma^2)
    t = tl.maximum(s, 0.0) * scale  # sigma^2
    if FILTER == 1:
        g = tl.where(t > 0.0, 0.5 * tl.log(tl.where(t > 0.0, t, 1.0)), float("-inf"))
    elif FILTER == 2:
        g = _log1p(tl.sqrt_rn(t))
    else:
        g = _log1p(t)
    return g


@triton.jit
def _predictor_kernel(
    s_ptr, U_ptr, W_ptr, ok_ptr, bad_ptr,
    n, n_chunks, alpha, eps, floor, scale,
    stride_sb, stride_sk,
    stride_ub, stride_ur, stride_uc,
    stride_wb, stride_wr, stride_wc,
    BLOCK: tl.constexpr,  # square output tile of W
    BLOCK_K: tl.constexpr,  # eigenpairs per reduction step
    ALPHA_MODE: tl.constexpr,  # 0: q ** alpha via exp2/log2, 1: alpha = 1/2 (sqrt), 2: alpha = 1
    FILTER: tl.constexpr,  # index in FILTERS: 0 power (q ** alpha), 1 log, 2 log1p, 3 log1p_sq of sqrt(scale * s)
):
    # Tiles on axis x (they grow as n^2: past 65535 from n = 23105 with 64 x 64 tiles), matrices on y.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    bm, bn = upper_tile(pid)  # this program's tile of the upper triangle of W, bm <= bn

    # The keep-or-replace decision is global per matrix, so every program re-derives it: max(s) and
    # finiteness of s (O(n) reads), and the per-row-chunk U flags written by _rows_finite_kernel.
    offs_k = tl.arange(0, BLOCK_K)
    smax = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    bad = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k0 in range(0, n, BLOCK_K):
        sk = tl.load(s_ptr + b * stride_sb + (k0 + offs_k) * stride_sk, mask=k0 + offs_k < n, other=0.0)
        smax = tl.maximum(smax, tl.where(k0 + offs_k < n, sk, float("-inf")))
        bad = tl.maximum(bad, ((sk - sk) != 0.0).to(tl.int32))
    for c0 in range(0, n_chunks, BLOCK_K):
        f = tl.load(bad_ptr + b * n_chunks + c0 + offs_k, mask=c0 + offs_k < n_chunks, other=0)
        bad = tl.maximum(bad, f.to(tl.int32))
    s_top = tl.max(smax, axis=0)
    if FILTER == 0:
        top = s_top
    else:
        top = _log_filter(s_top, scale, FILTER)  # g is increasing: g(max s) = max g
    ok = (tl.max(bad, axis=0) == 0) & (s_top > 0.0) & (top > 0.0)  # s_top = NaN also fails here
    inv_top = 1.0 / tl.where(ok, top, 1.0)

    offs_m = bm * BLOCK + tl.arange(0, BLOCK)
    offs_n = bn * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, tl.where(ok, n, 0), BLOCK_K):
        kk = k0 + offs_k
        sk = tl.load(s_ptr + b * stride_sb + kk * stride_sk, mask=kk < n, other=0.0)
        if FILTER == 0:
            q = tl.maximum(sk, 0.0) * inv_top
            if ALPHA_MODE == 1:
                qa = tl.sqrt_rn(q)
            elif ALPHA_MODE == 2:
                qa = q
            else:
                qa = tl.where(q > 0.0, tl.exp2(alpha * tl.log2(tl.where(q > 0.0, q, 1.0))), 0.0)
        else:
            qa = _log_filter(sk, scale, FILTER) * inv_top  # -inf for "log" at s <= 0: the floor below takes it
        p = tl.where(kk < n, tl.maximum(qa + eps, floor), 0.0)  # (BLOCK_K,)
        um = tl.load(U_ptr + b * stride_ub + offs_m[:, None] * stride_ur + kk[None, :] * stride_uc,
                     mask=(offs_m[:, None] < n) & (kk[None, :] < n), other=0.0)  # (BLOCK, BLOCK_K)
        unT = tl.load(U_ptr + b * stride_ub + offs_n[None, :] * stride_ur + kk[:, None] * stride_uc,
                      mask=(offs_n[None, :] < n) & (kk[:, None] < n), other=0.0)  # (BLOCK_K, BLOCK)
        acc = tl.dot(um * p[None, :], unT, acc, input_precision="ieee")  # no TF32: p spans 1e-4 .. 1

    in_bounds = (offs_m[:, None] < n) & (offs_n[None, :] < n)
    upper = (offs_m[:, None] <= offs_n[None, :]) | (bm != bn)
    strict = (offs_m[:, None] < offs_n[None, :]) | (bm != bn)
    w_base = W_ptr + b * stride_wb
    tl.store(w_base + offs_m[:, None] * stride_wr + offs_n[None, :] * stride_wc, acc, mask=in_bounds & upper & ok)
    tl.store(w_base + offs_n[None, :] * stride_wr + offs_m[:, None] * stride_wc, acc, mask=in_bounds & strict & ok)
    if pid == 0:
        tl.store(ok_ptr + b, ok.to(tl.int8))


def _batched(x: torch.Tensor, dims: int) -> torch.Tensor:
    return x if x.dim() == dims + 1 else x.unsqueeze(0)


def _check_eigh_args(s, U, alpha, eps, out, floor, filter="power", scale=None) -> None:
    if not isinstance(U, torch.Tensor) or U.dim() not in (2, 3) or U.shape[-1] != U.shape[-2]:
        raise ValueError(f"predictor_from_eigh: U must be (n, n) or (B, n, n), got {tuple(getattr(U, 'shape', ()))}")
    if s.shape != U.shape[:-1]:
        raise ValueError(f"predictor_from_eigh: s must have shape {tuple(U.shape[:-1])}, got {tuple(s.shape)}")
    if s.dtype != torch.float32 or U.dtype != torch.float32 or s.device != U.device:
        raise ValueError(f"predictor_from_eigh: s and U must be float32 on one device, got {s.dtype} on {s.device},"
                         f" {U.dtype} on {U.device}")
    if U.shape[-1] < 1:
        raise ValueError("predictor_from_eigh: n must be >= 1")
    if isinstance(alpha, torch.Tensor) or not float(alpha) > 0.0:
        raise ValueError(f"predictor_from_eigh: alpha must be a Python float > 0, got {alpha!r}")
    if isinstance(eps, torch.Tensor) or not float(eps) >= 0.0 or isinstance(floor, torch.Tensor):
        raise ValueError(f"predictor_from_eigh: eps (>= 0) and floor must be Python floats, got {eps!r}, {floor!r}")
    if out is not None and (out.shape != U.shape or out.dtype != torch.float32 or out.device != U.device):
        raise ValueError(f"predictor_from_eigh: out must be float32 {tuple(U.shape)} on {U.device}")
    if filter not in FILTERS:
        raise ValueError(f"predictor_from_eigh: filter must be one of {', '.join(FILTERS)}, got {filter!r}")
    if filter != "power" and (isinstance(scale, torch.Tensor) or scale is None or not float(scale) > 0.0):
        raise ValueError(f"predictor_from_eigh: filter={filter!r} needs a Python float scale > 0, got {scale!r}")


def _identity_like(U: torch.Tensor) -> torch.Tensor:
    n = U.shape[-1]
    return torch.eye(n, dtype=torch.float32, device=U.device).expand(U.shape).contiguous()


def predictor_from_eigh(
    s: torch.Tensor,
    U: torch.Tensor,
    alpha: float,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    floor: float = 1e-4,
    filter: str = "power",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W = U diag(p) U^T with q = clamp(s, 0) / max(s), p = max(q ** alpha + eps, floor), per matrix.

    filter: "power" (the above), or a log filter g of sigma = sqrt(scale * clamp(s, 0)) ("log": log sigma, "log1p":
    log(1 + sigma), "log1p_sq": log(1 + sigma^2)), with p = max(g(sigma) / g(sigma_max) + eps, floor) and alpha
    unused; `scale` (> 0) is needed then, and a matrix whose g(sigma_max) <= 0 is treated like max(s) <= 0.

    s: (n,) or (B, n) float32 eigenvalues (any order); U: (n, n) or (B, n, n) float32, eigenvectors as
    columns. out: optional W of U's shape, written in place; pass the previous W: a matrix whose
    max(s) <= 0 or whose s or U holds a non-finite value is left as it was (decided on the device,
    no host sync). Without out, such a matrix is the identity (W before any statistics).
    Returns (W, ok) with ok (..,) bool: True where W was written. fp32 throughout, IEEE products.
    """
    _check_eigh_args(s, U, alpha, eps, out, floor, filter, scale)
    launch = launch_device(U, _predictor_kernel, "predictor_from_eigh")
    batched = U.dim() == 3
    sb, Ub = _batched(s, 1), _batched(U, 2)
    W = out if out is not None else _identity_like(U)
    Wb = _batched(W, 2)
    B, n, _ = Ub.shape
    BLOCK, BLOCK_K, BLOCK_R = _tile_sizes(n)
    n_chunks = triton.cdiv(n, BLOCK_R)
    bad = torch.empty(B, n_chunks, dtype=torch.int8, device=U.device)
    ok = torch.empty(B, dtype=torch.int8, device=U.device)
    alpha = float(alpha)
    mode = 1 if alpha == 0.5 else 2 if alpha == 1.0 else 0
    if B > 0:
        finite_grid, build_grid = _grids(B, n)
        with launch:
            # Two launches: whether a matrix is replaced depends on all of U, which no single output
            # tile reads; the first pass reduces U's finiteness to one flag per 64 rows.
            _rows_finite_kernel[finite_grid](
                Ub, bad, n, Ub.stride(0), Ub.stride(1), Ub.stride(2), BLOCK_R=BLOCK_R, BLOCK_C=32,
            )
            _predictor_kernel[build_grid](
                sb, Ub, Wb, ok, bad,
                n, n_chunks, alpha, float(eps), float(floor), 1.0 if scale is None else float(scale),
                sb.stride(0), sb.stride(1),
                Ub.stride(0), Ub.stride(1), Ub.stride(2),
                Wb.stride(0), Wb.stride(1), Wb.stride(2),
                BLOCK=BLOCK, BLOCK_K=BLOCK_K, ALPHA_MODE=mode, FILTER=FILTERS.index(filter), num_warps=4,
            )
    ok = ok.bool()
    return W, (ok if batched else ok[0])


def _tile_sizes(n: int) -> tuple[int, int, int]:
    """(BLOCK, BLOCK_K, BLOCK_R): W tile, eigenpairs per step, U rows per finiteness flag. Untuned (no GPU yet);
    tl.dot needs tiles >= 16."""
    return (16 if n <= 16 else 32 if n <= 32 else 64), 32, 64


def _grids(B: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Grids of the finiteness pass and of the W build for B (n, n) matrices: host arithmetic only, so the
    tests check them at sizes too large to launch here. The long axes (row chunks, tiles) are on x."""
    BLOCK, _, BLOCK_R = _tile_sizes(n)
    n_tiles = triton.cdiv(n, BLOCK)
    grids = ((triton.cdiv(n, BLOCK_R), B), (n_tiles * (n_tiles + 1) // 2, B))
    for grid in grids:
        check_grid(grid, "predictor_from_eigh")
    return grids


def predictor_from_eigh_ref(
    s: torch.Tensor,
    U: torch.Tensor,
    alpha: float,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    floor: float = 1e-4,
    filter: str = "power",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `predictor_from_eigh` (same arguments and semantics), evaluated in float64."""
    _check_eigh_args(s, U, alpha, eps, out, floor, filter, scale)
    s64, U64 = s.to(torch.float64), U.to(torch.float64)
    top = s64.amax(-1, keepdim=True)
    ok = torch.isfinite(s64).all(-1) & torch.isfinite(U64).all((-2, -1)) & (top[..., 0] > 0)
    if filter == "power":
        q = s64.clamp(min=0) / torch.where(top > 0, top, 1.0)
        p = torch.clamp(q ** float(alpha) + eps, min=floor)
    else:
        p, g_ok = filter_weights(torch.where(torch.isfinite(s64), s64, 0.0), filter, float(scale), eps, floor)
        ok &= g_ok
    W_new = ((U64 * p.unsqueeze(-2)) @ U64.transpose(-1, -2)).to(torch.float32)
    W = out if out is not None else _identity_like(U)
    W.copy_(torch.where(ok[..., None, None], W_new, W))
    return W, ok




def _check_square(F: torch.Tensor, name: str) -> None:
    if not isinstance(F, torch.Tensor) or F.dim() not in (2, 3) or F.shape[-1] != F.shape[-2] or F.shape[-1] < 1:
        raise ValueError(f"{name}: F must be (n, n) or (B, n, n) with n >= 1, got {tuple(getattr(F, 'shape', ()))}")
    if F.dtype != torch.float32:
        raise ValueError(f"{name}: F must be float32, got {F.dtype}")


def _start_vector(B: int, n: int, device: torch.device) -> torch.Tensor:
    # Deterministic, without the RNG (state untouched, graph-capturable): all-positive with a ramp so
    # it is unlikely to be orthogonal to the top eigenvector of a correlation matrix.
    v = 1.0 + torch.arange(n, dtype=torch.float32, device=device) / (2 * n)
    return (v / v.norm()).expand(B, n).contiguous()


def largest_eigenvalue(
    F: torch.Tensor, v0: torch.Tensor | None = None, iters: int = 4, *, squarings: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """max(s) of a symmetric PSD F: power iteration on F^(2^squarings), warm-started from v0.

    F: (n, n) or (B, n, n) float32; v0: (n,) or (B, n) (e.g. the previous step's top vector) or None.
    Repeated squaring (normalised each time) turns the gap ratio s2/s1 into (s2/s1)^(2^squarings), so
    a few matvecs then separate even close top eigenvalues (0.9 -> 1e-3 per iteration at 6 squarings);
    smax is the Rayleigh quotient v^T F v of the final v, quadratically accurate in v's error. Costs
    `squarings` matmuls and `iters` matvecs, fp32, TF32 off, no host sync. Returns (smax (..,), v (.., n)).
    """
    _check_square(F, "largest_eigenvalue")
    batched = F.dim() == 3
    Fb = _batched(F, 2)
    B, n, _ = Fb.shape
    if v0 is not None and (v0.shape != F.shape[:-1] or v0.dtype != torch.float32 or v0.device != F.device):
        raise ValueError(f"largest_eigenvalue: v0 must be float32 {tuple(F.shape[:-1])} on {F.device}")
    v = _batched(v0, 1) if v0 is not None else _start_vector(B, n, F.device)
    with full_fp32_matmul():
        M = Fb
        for _ in range(squarings):
            M = M / M.square().sum((-2, -1), keepdim=True).sqrt().clamp_min(1e-30)  # no under/overflow
            M = M @ M
        for _ in range(iters):
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            v = (M @ v.unsqueeze(-1)).squeeze(-1)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        smax = (v * (Fb @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return (smax, v) if batched else (smax[0], v[0])


def largest_eigenvalue_ref(F: torch.Tensor) -> torch.Tensor:
    """max(s) from torch.linalg.eigvalsh in float64, cast to float32."""
    return torch.linalg.eigvalsh(F.to(torch.float64))[..., -1].to(torch.float32)


def predictor_newton_schulz(
    F: torch.Tensor,
    eps: float,
    *,
    iters: int = 14,
    smax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    v0: torch.Tensor | None = None,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DirectPred's W for alpha = 1/2 without an eigendecomposition: W = (F+ / max s)^(1/2) + eps I.

    For eps >= 1e-4 the floor of the contract never binds, so W is a matrix square root plus a ridge.
    The root comes from the coupled Newton-Schulz iteration Y <- Y T, Z <- T Z, T = (3I - Z Y) / 2 on
    A = F / ||F||_F (the Frobenius norm bounds the spectral norm, so A's spectrum lies in [0, 1]);
    matmuls only, fp32 with TF32 off. max s comes from `smax` if given, else from power iteration on F
    on F^64 warm-started from v0 (`largest_eigenvalue`). F: (n, n) or (B, n, n) float32, symmetric PSD up to rounding.

    Accuracy and its limit: an eigenvalue lam of A grows by ~2.25 per iteration until it converges
    (quadratically), so after `iters` iterations directions with lam >~ 2.25^-iters (~1e-5 at 14) are
    exact to fp32 and smaller ones are underestimated (error < sqrt(lam), at most ~3e-3 of the top
    direction); exact zeros stay zero. fp32 rounding gives F eigenvalues of size ~-1e-7 ||F||, which the
    iteration amplifies by the same factor instead of clamping them, so more iterations are not free.
    Returns (W, ok): ok (..,) bool is False, and `out` left as it was, where the last Newton-Schulz
    update was larger than tol (relative), max s <= 0, or anything was non-finite.
    """
    _check_square(F, "predictor_newton_schulz")
    if isinstance(eps, torch.Tensor) or not float(eps) >= 1e-4:
        raise ValueError(f"predictor_newton_schulz: eps must be a Python float >= 1e-4 (floor), got {eps!r}")
    if out is not None and (out.shape != F.shape or out.dtype != torch.float32 or out.device != F.device):
        raise ValueError(f"predictor_newton_schulz: out must be float32 {tuple(F.shape)} on {F.device}")
    batched = F.dim() == 3
    Fb = _batched(F, 2)
    B, n, _ = Fb.shape
    if smax is None:
        top, _ = largest_eigenvalue(Fb, None if v0 is None else _batched(v0, 1))
    else:
        top = smax.to(torch.float32).expand(B) if smax.dim() == 0 else smax.to(torch.float32)
    eye = torch.eye(n, dtype=torch.float32, device=F.device)
    c = Fb.square().sum((-2, -1)).sqrt()  # (B,), >= spectral norm
    with full_fp32_matmul():
        Y = Fb / torch.where(c > 0, c, 1.0)[:, None, None]
        Z = eye.expand(B, n, n)
        step = torch.zeros(B, dtype=torch.float32, device=F.device)
        for _ in range(iters):
            T = 1.5 * eye - 0.5 * (Z @ Y)
            Y_next = Y @ T
            step = (Y_next - Y).square().sum((-2, -1)).sqrt() / Y_next.square().sum((-2, -1)).sqrt().clamp_min(1e-30)
            Y, Z = Y_next, T @ Z
    W_new = Y * torch.sqrt(c / torch.where(top > 0, top, 1.0))[:, None, None] + float(eps) * eye
    W_new = 0.5 * (W_new + W_new.transpose(-1, -2))  # Y T is symmetric only up to rounding
    ok = (top > 0) & (c > 0) & (step <= tol) & torch.isfinite(W_new).all((-2, -1)) & torch.isfinite(top)
    W = out if out is not None else _identity_like(F)
    Wb = _batched(W, 2)
    Wb.copy_(torch.where(ok[:, None, None], W_new, Wb))
    return W, (ok if batched else ok[0])


def predictor_newton_schulz_ref(F: torch.Tensor, eps: float) -> torch.Tensor:
    """Float64 evaluation of the contract's W for alpha = 1/2 (eigh route), cast to float32."""
    s, U = torch.linalg.eigh(F.to(torch.float64))
    q = s.clamp(min=0) / s.amax(-1, keepdim=True)
    p = torch.clamp(q.sqrt() + eps, min=1e-4)
    return ((U * p.unsqueeze(-2)) @ U.transpose(-1, -2)).to(torch.float32)
