"""Residual stacks for engine tests: ODE-like (smooth in depth) and timm-like (conv + BatchNorm)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_resode.ode_models import ode_blocks


def smooth_blocks(depth: int, width: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[nn.Module]:
    """ODE-style blocks whose weights W(t) = A cos(2t) + B sin(2t) are smooth in depth (t = n/N)."""
    return ode_blocks(depth, width, "smooth", seed=seed, dtype=dtype)


class ConvBlock(nn.Module):
    """A small timm-like block: x + scale * BN(conv(act(BN(conv(x))))), optional dropout in the branch."""

    def __init__(self, channels: int, scale: float = 0.2, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.bn2(self.conv2(self.drop(self.act(self.bn1(self.conv1(x))))))


def conv_blocks(depth: int, channels: int = 4, dropout: float = 0.0, scale: float | None = None) -> list[nn.Module]:
    scale = 1.0 / depth if scale is None else scale
    return [ConvBlock(channels, scale=scale, dropout=dropout) for _ in range(depth)]


def flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((estimate - exact).norm() / exact.norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
