"""Predictor heads trained by gradient: the baselines DirectPredictor is compared against.

All map (N, d) -> (N, d), like `DirectPredictor`, so a training script swaps one for another.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearPredictor(nn.Module):
    """A trainable, bias-free linear predictor W: ``z @ W^T`` (the paper's "linear" baseline)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        _check_dim(dim)
        self.dim = dim
        self.linear = nn.Linear(dim, dim, bias=False)

    def extra_repr(self) -> str:
        return f"{self.dim}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_input(z, self.dim, type(self).__name__)
        return self.linear(z)


class MLPPredictor(nn.Module):
    """BYOL's two-layer predictor: Linear(d, hidden) - BatchNorm - ReLU - Linear(hidden, d).

    ``hidden=4096`` is BYOL's ImageNet setting; the DirectPred paper's STL-10/CIFAR runs use 512.
    """

    def __init__(self, dim: int, hidden: int = 4096) -> None:
        super().__init__()
        _check_dim(dim)
        _check_dim(hidden, name="hidden")
        self.dim, self.hidden = dim, hidden
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )

    def extra_repr(self) -> str:
        return f"{self.dim}, hidden={self.hidden}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_input(z, self.dim, type(self).__name__)
        return self.net(z)


class OffDiagonalPredictor(nn.Module):
    """Wen & Li's head: W = I + A with A zero on the diagonal and only its off-diagonal entries trainable.

    A starts at zero, so the head starts as the identity. The diagonal of W is exactly 1 under any
    optimizer, weight decay included: A's diagonal entries are masked out of the product, so whatever
    an optimizer does to them never reaches W (their gradient is exactly zero).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        _check_dim(dim)
        self.dim = dim
        self.A = nn.Parameter(torch.zeros(dim, dim))
        self.register_buffer("off_diagonal", 1.0 - torch.eye(dim), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.dim}"

    @property
    def matrix(self) -> torch.Tensor:
        """W = I + A (off-diagonal part), the (d, d) matrix applied as ``z @ W``."""
        return torch.eye(self.dim, device=self.A.device, dtype=self.A.dtype) + self.A * self.off_diagonal

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_input(z, self.dim, type(self).__name__)
        # z + z A_off rather than z (I + A_off): the identity part is then exact in any dtype.
        return z + z @ (self.A * self.off_diagonal).to(z.dtype)


def _check_dim(value: int, name: str = "dim") -> None:
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_input(z: torch.Tensor, dim: int, who: str) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != dim:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{who} expected input of shape (N, {dim}), got {got}")
