"""Feature streams that look like training: a decaying spectrum in a basis that rotates a little every step.

Generated on the bench device in float64 (then cast to fp32) so that large GPU cases do not wait on the CPU.
"""

from __future__ import annotations

import math

import torch

from bench.harness import DEVICE

STEPS = 6  # batches per stream: enough for the EMA to mix several batches, few enough to build fast


def feature_stream(
    n: int, d: int, *, seed: int, steps: int = STEPS, decades: float = 4.0, angle: float = 0.05
) -> list[torch.Tensor]:
    """`steps` fp32 batches (n, d) whose correlation has eigenvalues spread over `decades` decades.

    The spread is fixed in decades rather than per index so that every d gets a comparable conditioning
    (a geometric decay per index would underflow fp32 at d = 4096). Each step rotates the basis by about
    `angle` radians (spectral norm of the generator), whatever d is.
    """
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    f64 = {"dtype": torch.float64, "device": DEVICE}
    scales = 10.0 ** (-0.5 * decades * torch.arange(d, **f64) / max(d - 1, 1))  # sqrt of the eigenvalues
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, **f64))
    skew = torch.randn(d, d, generator=g, **f64)
    skew = (skew - skew.T) * (angle / (2.0 * math.sqrt(2.0 * d)))  # ||skew||_2 ~ angle for a Gaussian skew matrix
    rotation = torch.linalg.matrix_exp(skew)
    batches = []
    for _ in range(steps):
        basis = basis @ rotation
        batches.append(((torch.randn(n, d, generator=g, **f64) * scales) @ basis.T).float())
    return batches


def ping_pong(batches: list[torch.Tensor]):
    """Endless k-2, .., 1, 0, 1, .., k-1, k-2, ..: it continues a pass that ended on the last batch, and
    consecutive batches are always neighbours in the stream, so a warm-started solver never sees a jump that
    training would not produce."""
    k = len(batches)
    order = list(range(k - 2, -1, -1)) + list(range(1, k))
    while True:
        for i in order:
            yield batches[i]
