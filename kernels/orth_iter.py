"""Warm-started orthogonal (subspace) iteration with Householder QR in fp32, batched, no host synchronisation.

The design's "power/QR" route to F's eigenbasis, beside the Jacobi solver of `eigh.py`:

    Q_0 = U0 with its columns sorted by decreasing Rayleigh quotient (U0^T F U0)_ii
    Q_{k+1} R_{k+1} = F Q_k            (Householder QR, diag(R) >= 0)
    s = diag(Q^T F Q)                  (Rayleigh quotients), converged: off-diagonal mass of Q^T F Q <= tol ||F||_F

Column i converges at the rate s_{i+1} / s_i per iteration: slow wherever neighbouring eigenvalues are close,
which is everywhere in a smoothly decaying spectrum (4 decades over 64 eigenvalues: 0.86 per iteration). On its
own it is the route without a Rayleigh-Ritz step; `eigh_warm(F, Q)` is that step (Jacobi on Q^T F Q).

Why Householder and not CholeskyQR2: Y = F Q has the condition number of F (1e4 to 1e9 on real streams, infinite
when F is rank-deficient), past the 1/sqrt(eps) ~ 4e3 at which an fp32 Cholesky of Y^T Y breaks down; Householder
is backward stable column by column whatever the conditioning, and in registers it is one loop of n rank-one
updates (CholeskyQR2 would be two Cholesky loops and two triangular solves, each n serial steps).

One Triton program per matrix holds F, Q and the QR's working matrix in registers (n <= 64, padded to a power of
two P >= 16); the iteration loop runs on the device and stops per matrix once converged or at the cap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch_device
from .eigh import _SMALL_MAX, _polar_step, check_solver_args, load_warm, register_solve

__all__ = ["orth_iter", "orth_iter_ref"]


@triton.jit
def _householder_q(Y, r, col, n, P: tl.constexpr):
    """Q of the QR factorisation Y = Q R of a (P, P) register matrix, with diag(R) >= 0 (so Q is unique where Y
    has full rank). Columns j >= n of Y are zero (padding): no reflection, Q keeps the identity there."""
    Q = tl.where(r[:, None] == col, 1.0, 0.0)
    sign = tl.full((P,), 1.0, dtype=tl.float32)
    for j in range(0, n):
        x = tl.sum(tl.where(col == j, Y, 0.0), axis=1)  # column j, (P,)
        x = tl.where(r >= j, x, 0.0)
        x_j = tl.sum(tl.where(r == j, x, 0.0), axis=0)
        norm = tl.sqrt_rn(tl.sum(x * x, axis=0))
        # v = x + sign(x_j) ||x|| e_j (no cancellation); then R_jj = -sign(x_j) ||x||.
        s_j = tl.where(x_j >= 0.0, 1.0, -1.0)
        v = tl.where(r == j, x + s_j * norm, x)
        vv = tl.sum(v * v, axis=0)
        beta = tl.where(vv > 0.0, tl.div_rn(2.0, tl.where(vv > 0.0, vv, 1.0)), 0.0)  # x = 0: H = I
        w = tl.sum(v[:, None] * Y, axis=0)  # v^T Y, (P,)
        Y = Y - (beta * v)[:, None] * w[None, :]
        qv = tl.sum(Q * v[None, :], axis=1)  # Q v, (P,)
        Q = Q - (beta * qv)[:, None] * v[None, :]
        sign = tl.where(r == j, tl.where(norm > 0.0, -s_j, 1.0), sign)
    return Q * sign[None, :]


@triton.jit
def _rayleigh(F, Q, eye):
    """A = Q^T F Q (symmetrised), its diagonal, the off-diagonal Frobenius mass, and Y = F Q for the next step."""
    Y = tl.dot(F, Q, input_precision="ieee")  # no TF32: it would drown the small eigenvalues
    A = tl.dot(tl.trans(Q), Y, input_precision="ieee")
    A = 0.5 * (A + tl.trans(A))
    dia = tl.sum(tl.where(eye, A, 0.0), axis=1)
    off = tl.sqrt(tl.sum(tl.sum(tl.where(eye, 0.0, A * A), axis=1), axis=0))
    return Y, dia, off


@triton.jit
def _orth_iter_kernel(
    F_ptr, U0_ptr, s_ptr, Q_ptr, conv_ptr, iters_ptr, cap_ptr,
    n, max_iters, tol,
    stride_fb, stride_fr, stride_fc,
    stride_u0b, stride_u0r, stride_u0c,
    stride_qb, stride_qr, stride_qc,
    stride_cap,  # 0 when one cap is shared by the batch
    P: tl.constexpr,  # n padded to a power of two (>= 16 for tl.dot)
    HAS_U0: tl.constexpr,  # start from U0 (else the identity)
    HAS_CAP: tl.constexpr,  # read a device iteration cap (min with max_iters)
):
    b = tl.program_id(0).to(tl.int64)
    # Padding: zero rows/cols of F and an identity block in Q; Householder leaves both as they are.
    r, row, col, eye, real, F, Q = load_warm(F_ptr, U0_ptr, b, n, stride_fb, stride_fr, stride_fc,
                                             stride_u0b, stride_u0r, stride_u0c, P, HAS_U0)
    thr = tol * tl.sqrt(tl.sum(tl.sum(F * F, axis=1), axis=0))

    # Sort Q's columns by decreasing Rayleigh quotient: orthogonal iteration orders column i after the i largest
    # eigenvalues, and a warm basis in another order (Jacobi leaves it unsorted) would first have to rotate
    # whole columns into place. Rank by a (P, P) comparison (ties by index: a permutation), applied by a register
    # gather (a product with a 0/1 matrix is exact too, but its tl.dot operands spilled 4 KB per thread at P = 64
    # on sm_90). Padded columns rank last, in order.
    Y, dia, off = _rayleigh(F, Q, eye)
    key = tl.where((r < n) & (dia == dia), dia, float("-inf"))  # NaN ranks like padding: still a permutation
    key_i = tl.broadcast_to(key[:, None], (P, P))  # key of row i
    key_j = tl.broadcast_to(key[None, :], (P, P))
    before = (key_j > key_i) | ((key_j == key_i) & (col < row))  # column j goes before column i
    rank = tl.sum(before.to(tl.int32), axis=1)  # (P,)
    src = tl.sum(tl.where(rank[:, None] == col, row, 0), axis=0)  # column c of the result is column src[c]
    src_cols = tl.broadcast_to(src[None, :], (P, P))
    Q = tl.gather(Q, src_cols, axis=1)
    Y = tl.gather(Y, src_cols, axis=1)
    dia = tl.gather(dia, src, axis=0)  # the off-diagonal mass is unchanged

    cap = max_iters
    if HAS_CAP:
        cap = tl.minimum(tl.load(cap_ptr + b * stride_cap).to(tl.int32), max_iters)
    iters = 0
    # A NaN makes `off > thr` false: the loop ends and the matrix reports converged = False.
    while (iters < cap) & (off > thr):
        Q = _householder_q(Y, r, col, n, P)
        # F again from memory (L1/L2): kept live across the loop, its tl.dot operand copy spilled ~5 KB per thread at
        # P = 64 on sm_90.
        F = tl.load(F_ptr + b * stride_fb + row * stride_fr + col * stride_fc, mask=real, other=0.0)
        Y, dia, off = _rayleigh(F, Q, eye)
        iters += 1

    # Householder's Q is orthogonal to ~n ulp; one Newton-Schulz polar step takes it to ~1e-7, as in eigh_warm, so
    # that warm starts do not drift off orthogonal across steps.
    Q = _polar_step(Q, eye)
    tl.store(s_ptr + b * n + r, dia, mask=r < n)
    tl.store(Q_ptr + b * stride_qb + row * stride_qr + col * stride_qc, Q, mask=real)
    tl.store(conv_ptr + b, (off <= thr).to(tl.int8))
    tl.store(iters_ptr + b, iters)


def orth_iter(
    F: torch.Tensor,
    U0: torch.Tensor | None = None,
    *,
    max_iters: int = 8,
    tol: float = 2e-6,
    iters_cap: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthogonal iteration Q <- qr(F Q) from the warm basis U0, for symmetric float32 F with n <= 64.

    F: (n, n) or (B, n, n) float32, symmetric. U0: same shape, orthogonal (e.g. the previous step's U), or None
    (identity). Returns s (.., n), the Rayleigh quotients diag(Q^T F Q) in decreasing order as far as the
    iteration has sorted them; Q (.., n, n), orthonormal columns; converged (..,) bool: the off-diagonal
    Frobenius mass of Q^T F Q is <= tol * ||F||_F (the criterion of `eigh_warm`), i.e. Q is an eigenbasis
    to that tolerance. Iterations stop per matrix once converged, or at min(max_iters, iters_cap); iters_cap may
    be a device int tensor, 0-dim or (B,), read on the device. With 0 iterations Q is U0 with its columns
    sorted by Rayleigh quotient. There is no Rayleigh-Ritz step: `eigh_warm(F, Q)` is one. fp32 with IEEE
    products, no host synchronisation (CUDA-graph capturable).
    """
    check_solver_args("orth_iter", F, U0, iters_cap, max_iters, tol, count_name="max_iters", cap_name="iters_cap")
    n = F.shape[-1]
    if n > _SMALL_MAX:
        raise ValueError(f"orth_iter: n must be <= {_SMALL_MAX} (one program per matrix, in registers), got {n}")
    with launch_device(F, _orth_iter_kernel, "orth_iter"):
        return _orth_iter(F, U0, iters_cap, max_iters, tol)


def _orth_iter(F, U0, cap, max_iters: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batched = F.dim() == 3
    A = F if batched else F.unsqueeze(0)  # (B, n, n)
    U0b = None if U0 is None else (U0 if batched else U0.unsqueeze(0))
    if cap is not None and not isinstance(cap, torch.Tensor):
        max_iters, cap = min(max_iters, max(int(cap), 0)), None
    s, Q, conv, _ = register_solve(_orth_iter_kernel, "orth_iter", A, U0b, cap, max_iters, tol)
    if not batched:
        return s[0], Q[0], conv[0]
    return s, Q, conv


def orth_iter_ref(
    F: torch.Tensor,
    U0: torch.Tensor | None = None,
    *,
    max_iters: int = 8,
    tol: float = 2e-6,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same iteration in plain torch (LAPACK Householder QR), any n, evaluated in `dtype` (float64: the test
    oracle; float32: the CPU baseline). One iteration count for the whole batch (a matrix stops once converged).
    Returns (s, Q, converged) like `orth_iter`, cast to float32."""
    check_solver_args("orth_iter_ref", F, U0, None, max_iters, tol, count_name="max_iters", cap_name="iters_cap")
    batched = F.dim() == 3
    Fb = (F if batched else F.unsqueeze(0)).to(dtype)
    n = Fb.shape[-1]
    Q = torch.eye(n, dtype=dtype, device=F.device).expand_as(Fb) if U0 is None else (
        U0 if batched else U0.unsqueeze(0)).to(dtype)
    thr = tol * Fb.norm(dim=(-2, -1))

    def rayleigh(Q):
        Y = Fb @ Q
        A = Q.mT @ Y
        A = 0.5 * (A + A.mT)
        dia = torch.diagonal(A, dim1=-2, dim2=-1)
        return Y, dia, (A - torch.diag_embed(dia)).norm(dim=(-2, -1))

    _, dia, _ = rayleigh(Q)
    order = torch.sort(dia, dim=-1, descending=True, stable=True).indices
    Q = torch.gather(Q, -1, order.unsqueeze(-2).expand_as(Q))
    Y, dia, off = rayleigh(Q)
    for _ in range(max_iters):
        active = off > thr  # NaN: inactive, as in the kernel
        if not bool(active.any()):
            break
        Qn, R = torch.linalg.qr(Y)
        sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(dtype)
        Q = torch.where(active[:, None, None], Qn * sign.unsqueeze(-2), Q)
        Y, dia, off = rayleigh(Q)
    out = dia.float(), Q.float(), off <= thr
    return out if batched else tuple(x[0] for x in out)
