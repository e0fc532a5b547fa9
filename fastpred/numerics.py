"""Numerical guards shared by the predictor backends.

`full_fp32_matmul` is defined in `fastpred.kernels._common` (torch only), the layer below both the
kernels and the backends, and re-exported here.
"""

from fastpred.kernels._common import full_fp32_matmul

__all__ = ["full_fp32_matmul"]
