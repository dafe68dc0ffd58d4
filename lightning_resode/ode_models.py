"""Residual stacks that discretize a Neural ODE: the paper's toy models, shared by the reproductions.

A stack of N blocks x_{n+1} = x_n + (T/N) tanh(W_n x_n + b_n) is the Euler scheme of
dx/dt = tanh(W(t) x + b(t)) on [0, T] when W_n = W(nT/N) for a smooth path W(t). With weights drawn
independently per block there is no such path; the closest ODE is the one whose weights interpolate the
blocks' weights linearly in t, and its vector field gets rougher as N grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

DepthProfile = Literal["smooth", "iid"]
DEPTH_PROFILES: tuple[str, ...] = ("smooth", "iid")


class OdeResidualBlock(nn.Module):
    """x ↦ x + step_size · tanh(W x + b): one Euler step of a Neural ODE with a Lipschitz residual."""

    def __init__(self, width: int, step_size: float) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be a positive number of features, got {width}")
        if not step_size > 0:
            raise ValueError(f"step_size must be positive (horizon / depth), got {step_size}")
        self.linear = nn.Linear(width, width)
        self.step_size = step_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.step_size * torch.tanh(self.linear(x))


@dataclass(frozen=True)
class DepthWeights:
    """Per-block weights (N, d, d) and biases (N, d), and the continuous path they came from (if any)."""

    weights: torch.Tensor
    biases: torch.Tensor
    horizon: float
    path: Callable[[float], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def depth(self) -> int:
        return self.weights.shape[0]

    @property
    def width(self) -> int:
        return self.weights.shape[1]

    def at_time(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """θ(t) of the Neural ODE this stack is compared with.

        The smooth path itself when there is one (the limit ODE); otherwise the blocks' weights
        interpolated linearly between block times nT/N (held constant after the last block).
        """
        if self.path is not None:
            return self.path(t)
        position = min(max(t / self.horizon * self.depth, 0.0), self.depth - 1.0)
        lower = min(int(math.floor(position)), self.depth - 1)
        upper = min(lower + 1, self.depth - 1)
        frac = position - lower
        weight = (1 - frac) * self.weights[lower] + frac * self.weights[upper]
        bias = (1 - frac) * self.biases[lower] + frac * self.biases[upper]
        return weight, bias

    def vector_field(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """f(t, x) = tanh(W(t) x + b(t)), in the signature torchdiffeq's ``odeint`` expects."""

        def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            weight, bias = self.at_time(float(t))
            return torch.tanh(x @ weight.T + bias)

        return field

    def blocks(self) -> list[OdeResidualBlock]:
        """The ResNet: one ``OdeResidualBlock`` per depth index, step size T/N."""
        step = self.horizon / self.depth
        blocks = []
        for weight, bias in zip(self.weights, self.biases):
            block = OdeResidualBlock(self.width, step).to(self.weights.dtype)
            with torch.no_grad():
                block.linear.weight.copy_(weight)
                block.linear.bias.copy_(bias)
            blocks.append(block)
        return blocks


def depth_weights(
    depth: int,
    width: int,
    profile: DepthProfile = "smooth",
    *,
    horizon: float = 1.0,
    scale: float = 1.5,
    frequency: float = 2.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> DepthWeights:
    """Weights for an N-block ODE-style stack, smooth in depth or drawn independently per block.

    ``smooth``: W(t) = A cos(ωt) + B sin(ωt), b(t) = c cos(t), sampled at t = nT/N; the same seed gives the
    same path at every depth, so stacks of different depth discretize one ODE. ``iid``: every block draws its
    own W_n, b_n with the same marginal scale. ``scale`` sets ‖W‖ ≈ scale (the residual's Lipschitz bound).
    """
    if depth < 1:
        raise ValueError(f"depth must be a positive number of blocks, got {depth}")
    if profile not in DEPTH_PROFILES:
        raise ValueError(f"unknown depth profile {profile!r}; valid: {list(DEPTH_PROFILES)}")
    gen = torch.Generator().manual_seed(seed)
    std = scale / math.sqrt(width)
    if profile == "iid":
        iid_gen = torch.Generator().manual_seed(seed * 1_000_003 + depth)
        weights = torch.randn(depth, width, width, generator=iid_gen, dtype=dtype) * std
        biases = torch.randn(depth, width, generator=iid_gen, dtype=dtype) * 0.3
        return DepthWeights(weights, biases, horizon)
    a = torch.randn(width, width, generator=gen, dtype=dtype) * std
    b = torch.randn(width, width, generator=gen, dtype=dtype) * std
    c = torch.randn(width, generator=gen, dtype=dtype) * 0.3

    def path(t: float) -> tuple[torch.Tensor, torch.Tensor]:
        return a * math.cos(frequency * t) + b * math.sin(frequency * t), c * math.cos(t)

    samples = [path(n * horizon / depth) for n in range(depth)]
    weights = torch.stack([w for w, _ in samples])
    biases = torch.stack([bias for _, bias in samples])
    return DepthWeights(weights, biases, horizon, path)


def ode_blocks(depth: int, width: int, profile: DepthProfile = "smooth", **options) -> list[OdeResidualBlock]:
    """Shortcut: the N blocks of ``depth_weights(depth, width, profile, **options)``."""
    return depth_weights(depth, width, profile, **options).blocks()
