"""Fused correlation EMA: F <- rho * F + (1 - rho) * z^T z / N, in place, in one pass over z.

Symbols (DESIGN.md): z is the predictor input, (N, d); F is the (d, d) moving average of its
correlation C(z) = z^T z / N. Only the upper-triangle tiles of z^T z are computed; each is mirrored
into the lower triangle by the program that computed it, so F stays exactly symmetric.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import feature_blocks
from ._launch import check_grid, launch_device
from ._tiles import upper_tile

__all__ = ["corr_ema", "corr_ema_ref"]


@triton.jit
def _flags(first_ptr, valid_ptr, HAS_FIRST: tl.constexpr, HAS_VALID: tl.constexpr):
    is_first = False
    if HAS_FIRST:
        is_first = tl.load(first_ptr) != 0
    is_valid = True
    if HAS_VALID:
        is_valid = tl.load(valid_ptr) != 0
    return is_first, is_valid


@triton.jit
def _gram_tile(
    z_ptr, N, d, stride_zn, stride_zd, row_start, row_end, bm, bn,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr, HAS_MEAN: tl.constexpr,
):
    """Tile (bm, bn) of z[rows]^T z[rows] over rows [row_start, row_end), fp32, and the column sums of tile bn."""
    offs_m = bm * BLOCK + tl.arange(0, BLOCK)
    offs_n = bn * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_N)
    mask_m = offs_m < d
    mask_n = offs_n < d
    # int64 offsets: with int32 strides (Triton passes an int that fits as i32) row * stride_zn would wrap past
    # 2^31 elements of z.
    col_m = offs_m.to(tl.int64)[None, :] * stride_zd
    col_n = offs_n.to(tl.int64)[None, :] * stride_zd
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(row_start, row_end, BLOCK_N):
        rows = k0 + offs_k
        in_rows = rows < row_end
        row_off = rows.to(tl.int64)[:, None] * stride_zn
        zm = tl.load(z_ptr + row_off + col_m, mask=in_rows[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_N, BLOCK)
        zn = tl.load(z_ptr + row_off + col_n, mask=in_rows[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_N, BLOCK)
        if FP32_DOT:
            zm = zm.to(tl.float32)
            zn = zn.to(tl.float32)
            acc = tl.dot(tl.trans(zm), zn, acc, input_precision="ieee")
        else:
            # bf16/fp16 products are exact in fp32, but tensor cores do not round their accumulation like IEEE
            # fp32 (an emulation: relative error of z^T z 4e-5 to 2e-4 at N = 16384, growing with N, against
            # 9e-7 in IEEE fp32). So each BLOCK_N chunk is reduced from zero and added in IEEE fp32 here. Not
            # `acc += tl.dot(...)`: Triton folds that add back into the dot's accumulator (3.6 and 3.8 alike);
            # an fma by 1 is not folded (tests/test_kernels_compile_sm90.py checks the dot starts from zero).
            acc = tl.fma(tl.dot(tl.trans(zm), zn, out_dtype=tl.float32), 1.0, acc)
        if HAS_MEAN:
            col_sum += tl.sum(zn.to(tl.float32), axis=0)
    return acc, col_sum


@triton.jit
def _ema_store(
    acc, col_sum, F_ptr, mean_ptr, N, d, bm, bn, rho, scale_new, scale_first, is_first, is_valid,
    BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr,
):
    """F[tile] <- acc / N (first) or rho F[tile] + (1 - rho) acc / N, mirrored; nothing when not is_valid."""
    offs_m = bm * BLOCK + tl.arange(0, BLOCK)
    offs_n = bn * BLOCK + tl.arange(0, BLOCK)
    mask_m = offs_m < d
    mask_n = offs_n < d
    tile = offs_m[:, None] * d + offs_n[None, :]
    mirror = offs_n[None, :] * d + offs_m[:, None]
    in_bounds = mask_m[:, None] & mask_n[None, :]
    # F is symmetric: read only the upper triangle. When `first`, F may hold garbage (even NaN),
    # so it is not read at all rather than multiplied by zero.
    F_old = tl.load(F_ptr + tile, mask=in_bounds & (is_first == 0), other=0.0)
    F_new = tl.where(is_first, acc * scale_first, rho * F_old + scale_new * acc)
    # Diagonal tiles: the upper half (incl. the diagonal) is stored as is and mirrored into the lower
    # half, so F is exactly symmetric even if the tile product is not bitwise symmetric.
    upper = (offs_m[:, None] <= offs_n[None, :]) | (bm != bn)
    strict = (offs_m[:, None] < offs_n[None, :]) | (bm != bn)
    tl.store(F_ptr + tile, F_new, mask=in_bounds & upper & is_valid)
    tl.store(F_ptr + mirror, F_new, mask=in_bounds & strict & is_valid)
    if HAS_MEAN:
        tl.store(mean_ptr + offs_n, col_sum / N, mask=mask_n & (bm == bn) & is_valid)


@triton.jit
def _corr_ema_kernel(
    z_ptr, F_ptr, mean_ptr, first_ptr, valid_ptr,
    N, d,
    stride_zn, stride_zd,
    rho, scale_new, scale_first,  # rho, (1 - rho) / N and 1 / N, rounded once on the host
    BLOCK: tl.constexpr,  # square output tile of F
    BLOCK_N: tl.constexpr,  # rows of z per reduction step
    FP32_DOT: tl.constexpr,  # upcast z and force IEEE fp32 products (TF32 would corrupt small eigenvalues)
    HAS_FIRST: tl.constexpr,  # read the device flag `first`
    HAS_VALID: tl.constexpr,  # read the device flag `valid`
    HAS_MEAN: tl.constexpr,  # write z.mean(0) from the diagonal tiles
):
    # One program per tile of the upper triangle of one feature block g (axis 1), over all N rows.
    bm, bn = upper_tile(tl.program_id(0))
    g = tl.program_id(1).to(tl.int64)
    z_ptr += g * d * stride_zd
    F_ptr += g * d * d
    mean_ptr += g * d
    is_first, is_valid = _flags(first_ptr, valid_ptr, HAS_FIRST, HAS_VALID)
    # An invalid batch (non-finite values upstream) must not be read into F at all: skip the loop.
    acc, col_sum = _gram_tile(z_ptr, N, d, stride_zn, stride_zd, 0, tl.where(is_valid, N, 0), bm, bn,
                              BLOCK, BLOCK_N, FP32_DOT, HAS_MEAN)
    _ema_store(acc, col_sum, F_ptr, mean_ptr, N, d, bm, bn, rho, scale_new, scale_first, is_first, is_valid,
               BLOCK, HAS_MEAN)


@triton.jit
def _corr_partial_kernel(
    z_ptr, part_ptr, colsum_ptr, valid_ptr,
    N, d, rows_per_split, splits,
    stride_zn, stride_zd,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_MEAN: tl.constexpr,
):
    # Split-K, stage 1: program (tile t, split sp, block g) sums rows [sp * rows_per_split, ...) into
    # part[g, sp, t]. Tiles and splits share axis x (2^31 - 1 programs; y would stop at 65535 splits).
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0) // splits
    t = pid % n_prog
    sp = pid // n_prog
    g = tl.program_id(1).to(tl.int64)
    z_ptr += g * d * stride_zd
    bm, bn = upper_tile(t)
    _, is_valid = _flags(valid_ptr, valid_ptr, False, HAS_VALID)
    start = sp * rows_per_split
    end = tl.where(is_valid, tl.minimum(start + rows_per_split, N), start)
    acc, col_sum = _gram_tile(z_ptr, N, d, stride_zn, stride_zd, start, end, bm, bn,
                              BLOCK, BLOCK_N, FP32_DOT, HAS_MEAN)
    r = tl.arange(0, BLOCK)
    base = ((g * splits + sp) * n_prog + t) * BLOCK
    tl.store(part_ptr + (base + r[:, None]) * BLOCK + r[None, :], acc)
    if HAS_MEAN:
        tl.store(colsum_ptr + base + r, col_sum)


@triton.jit
def _corr_finish_kernel(
    part_ptr, colsum_ptr, F_ptr, mean_ptr, first_ptr, valid_ptr,
    N, d, splits,
    rho, scale_new, scale_first,
    BLOCK: tl.constexpr, HAS_FIRST: tl.constexpr, HAS_VALID: tl.constexpr, HAS_MEAN: tl.constexpr,
):
    # Split-K, stage 2: the splits of tile t of block g summed in a fixed order (deterministic), then the EMA.
    t = tl.program_id(0)
    n_prog = tl.num_programs(0)
    g = tl.program_id(1).to(tl.int64)
    F_ptr += g * d * d
    mean_ptr += g * d
    bm, bn = upper_tile(t)
    is_first, is_valid = _flags(first_ptr, valid_ptr, HAS_FIRST, HAS_VALID)
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for sp in range(0, splits):
        base = ((g * splits + sp) * n_prog + t) * BLOCK
        acc += tl.load(part_ptr + (base + r[:, None]) * BLOCK + r[None, :])
        if HAS_MEAN:
            col_sum += tl.load(colsum_ptr + base + r)
    _ema_store(acc, col_sum, F_ptr, mean_ptr, N, d, bm, bn, rho, scale_new, scale_first, is_first, is_valid,
               BLOCK, HAS_MEAN)


def _flag(x: torch.Tensor | None, name: str, device: torch.device) -> torch.Tensor | None:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.dim() != 0:
        raise ValueError(f"corr_ema: `{name}` must be a 0-dim tensor, got {type(x).__name__}"
                         f"{'' if not isinstance(x, torch.Tensor) else f' of shape {tuple(x.shape)}'}")
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise ValueError(f"corr_ema: `{name}` must be an integer or bool tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"corr_ema: `{name}` is on {x.device}, z is on {device}")
    # Triton reads a bool pointer as i1; a uint8 view is the same byte without relying on that.
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def _check(F: torch.Tensor, z: torch.Tensor, rho: float, mean: torch.Tensor | None, splits: int | None) -> None:
    if z.dim() != 2:
        raise ValueError(f"corr_ema: z must be (N, d), got shape {tuple(z.shape)}")
    N, d = z.shape
    if N < 1 or d < 1:
        raise ValueError(f"corr_ema: z must have N >= 1 rows and d >= 1 columns, got {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"corr_ema: z must be float32, bfloat16 or float16, got {z.dtype}")
    grouped = F.dim() == 3 and F.shape[0] >= 1 and F.shape[0] * F.shape[1] == d and F.shape[1] == F.shape[2]
    if not (F.shape == (d, d) or grouped) or F.dtype != torch.float32:
        raise ValueError(f"corr_ema: F must be ({d}, {d}) or (G, {d} / G, {d} / G) float32, got "
                         f"{tuple(F.shape)} {F.dtype}")
    if not F.is_contiguous():
        raise ValueError("corr_ema: F must be contiguous (it is updated in place)")
    if F.device != z.device:
        raise ValueError(f"corr_ema: F is on {F.device}, z is on {z.device}")
    if isinstance(rho, torch.Tensor) or not 0.0 <= float(rho) < 1.0:
        raise ValueError(f"corr_ema: rho must be a Python float in [0, 1), got {rho!r}")
    if mean is not None and (mean.shape != (d,) or mean.dtype != torch.float32 or mean.device != z.device
                             or not mean.is_contiguous()):
        raise ValueError(f"corr_ema: mean must be a contiguous ({d},) float32 tensor on {z.device}")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"corr_ema: splits must be None or an int >= 1, got {splits!r}")


def corr_ema(
    F: torch.Tensor,
    z: torch.Tensor,
    rho: float,
    *,
    first: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Fold the correlation of a batch into its EMA, in place: F <- rho F + (1 - rho) z^T z / N.

    F: (d, d) float32, contiguous, symmetric (only its upper triangle is read); or (G, d / G, d / G) for G
    contiguous feature blocks, F[g] <- rho F[g] + (1 - rho) z_g^T z_g / N with z_g = z[:, g m : (g + 1) m]
    (a block-diagonal statistic; one launch for all blocks). z: (N, d) float32, bfloat16 or float16, any
    strides. rho: Python float in [0, 1). All accumulation is fp32.
    first: optional 0-dim int/bool tensor on z's device; when nonzero, F <- z^T z / N (F is not read).
    valid: optional 0-dim int/bool tensor; when zero nothing is written (F and mean untouched).
    mean: optional (d,) float32 output receiving z.mean(0), computed in the same pass.
    splits: how many slices of the N rows are reduced in parallel (split-K; a second launch sums them in
    a fixed order). None picks enough to give a GPU about two programs per SM when d alone gives few
    tiles (d = 256: 10 tiles of 64 x 64), and 1 on the CPU.
    Both flags are read on the device: no host synchronisation, CUDA-graph capturable. Returns F.
    """
    _check(F, z, rho, mean, splits)
    launch = launch_device(z, _corr_ema_kernel, "corr_ema")
    N = z.shape[0]
    G, d = (1, F.shape[0]) if F.dim() == 2 else (F.shape[0], F.shape[1])  # d: the size of one block
    first_t = _flag(first, "first", z.device)
    valid_t = _flag(valid, "valid", z.device)
    plan = _plan(N, d, G, splits, _sm_count(z.device) if z.is_cuda else None)
    # bf16/fp16 take the tensor-core route, under the interpreter too (it widens bf16 exactly: _launch.py).
    fp32_dot = z.dtype == torch.float32
    has = dict(HAS_FIRST=first_t is not None, HAS_VALID=valid_t is not None, HAS_MEAN=mean is not None)
    mean_arg = mean if mean is not None else F
    first_arg = first_t if first_t is not None else F
    valid_arg = valid_t if valid_t is not None else F
    scales = (float(rho), (1.0 - float(rho)) / N, 1.0 / N)
    tiles = dict(BLOCK=plan.BLOCK, BLOCK_N=plan.BLOCK_N, FP32_DOT=fp32_dot)
    with launch:
        if plan.splits == 1:
            _corr_ema_kernel[plan.grids[0]](
                z, F, mean_arg, first_arg, valid_arg, N, d, z.stride(0), z.stride(1), *scales,
                **tiles, **has, num_warps=4,
            )
        else:
            shape = (G, plan.splits, plan.n_prog, plan.BLOCK)
            part = torch.empty(*shape, plan.BLOCK, dtype=torch.float32, device=z.device)
            colsum = torch.empty(*shape, dtype=torch.float32, device=z.device)
            _corr_partial_kernel[plan.grids[0]](
                z, part, colsum, valid_arg, N, d, plan.rows_per_split, plan.splits, z.stride(0), z.stride(1),
                **tiles, HAS_VALID=has["HAS_VALID"], HAS_MEAN=has["HAS_MEAN"], num_warps=4,
            )
            _corr_finish_kernel[plan.grids[1]](
                part, colsum, F, mean_arg, first_arg, valid_arg, N, d, plan.splits, *scales,
                BLOCK=plan.BLOCK, **has, num_warps=4,
            )
    return F


class _Plan(NamedTuple):
    BLOCK: int  # square output tile of F
    BLOCK_N: int  # rows of z per reduction step
    n_prog: int  # upper-triangle tiles of one feature block
    splits: int  # slices of N reduced in parallel (1: no split-K)
    rows_per_split: int
    grids: tuple[tuple[int, ...], ...]  # one grid per launch


def _plan(N: int, d: int, G: int, splits: int | None, sms: int | None) -> _Plan:
    """Tiles, split-K and launch grids for z (N, G d) into F (G, d, d): host arithmetic only, so the tests
    check the grids at sizes too large to launch here. sms: the GPU's SM count, None on the CPU."""
    # Fixed configs, not tuned on a GPU yet (none was available): 64 x 64 output tiles keep register
    # use moderate for 4 warps; smaller d gets the smallest tile that tl.dot accepts (16).
    BLOCK = 16 if d <= 16 else 32 if d <= 32 else 64
    BLOCK_N = 32
    n_tiles = triton.cdiv(d, BLOCK)
    n_prog = n_tiles * (n_tiles + 1) // 2
    if splits is None:
        # About two programs per SM, and slices of at least 8 row blocks so the second pass stays small.
        splits = 1 if sms is None else max(1, min(triton.cdiv(2 * sms, n_prog * G), triton.cdiv(N, 8 * BLOCK_N)))
    rows_per_split = triton.cdiv(triton.cdiv(N, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(N, rows_per_split)  # no empty slice
    # Feature blocks go on axis y (at most 65535 of them); tiles, and tiles x splits, on axis x.
    grids = ((n_prog, G),) if splits == 1 else ((n_prog * splits, G), (n_prog, G))
    for grid in grids:
        check_grid(grid, "corr_ema")
    return _Plan(BLOCK, BLOCK_N, n_prog, splits, rows_per_split, grids)


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def corr_ema_ref(
    F: torch.Tensor,
    z: torch.Tensor,
    rho: float,
    *,
    first: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Reference of `corr_ema` (same arguments, same in-place semantics), accumulated in float64; splits,
    a scheduling choice of the kernel, changes nothing here.

    The flags are applied with torch.where, so this path does not synchronise with the host either.
    """
    _check(F, z, rho, mean, splits)
    z64 = z.to(torch.float64)  # (N, d); float64 also keeps TF32 out of the product
    N = z64.shape[0]
    blocks = feature_blocks(z64, 1 if F.dim() == 2 else F.shape[0])  # (G, N, m)
    C = (blocks.mT @ blocks / N).reshape(F.shape)
    new = rho * F.to(torch.float64) + (1.0 - rho) * C
    if first is not None:
        new = torch.where(first != 0, C, new)
    keep = None if valid is None else valid != 0
    F.copy_(new.to(torch.float32) if keep is None else torch.where(keep, new.to(torch.float32), F))
    if mean is not None:
        m = z64.mean(0).to(torch.float32)
        mean.copy_(m if keep is None else torch.where(keep, m, mean))
    return F
