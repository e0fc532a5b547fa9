"""Tile index helpers shared by the kernels that compute one triangle of a symmetric result."""

import triton
import triton.language as tl


@triton.jit
def upper_tile(pid):
    """Program id -> (row tile bm, column tile bn) with bm <= bn, enumerating the upper triangle column by
    column: pid = bn (bn + 1) / 2 + bm. The float square root guesses bn; the integer fix-ups make it exact."""
    bn = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    bn = tl.where(bn * (bn + 1) // 2 > pid, bn - 1, bn)
    bn = tl.where((bn + 1) * (bn + 2) // 2 <= pid, bn + 1, bn)
    return pid - bn * (bn + 1) // 2, bn
