"""The paper's deep ODE-style ResNet for images, registered in timm as ``ode_resnet``.

One stage of ``depth`` same-shape blocks x ← x + (T/depth)·g_n(x): the Euler discretisation of
dx/dt = g(x, t) on [0, T]. With ``tied=True`` every block is the same module (weights shared across depth,
the first phase of the paper's two-phase route); an untied model loads a tied checkpoint directly, since
the tied model's state_dict repeats the shared block under every index. Built on ``AdjointSequential``,
so it trains with the adjoint (Euler or Heun) from scratch without ``to_adjoint``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn

from .adjoint import AdjointSequential


class OdeConvBlock(nn.Module):
    """x ↦ x + step·conv(tanh(bn(conv(x)))): a Lipschitz residual whose step shrinks with depth."""

    def __init__(self, width: int, step_size: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.bias)
        self.step_size = step_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.step_size * self.conv2(torch.tanh(self.bn1(self.conv1(x))))


class OdeResNet(nn.Module):
    """stem (conv, BN, ReLU) → one adjoint stage of ``depth`` blocks → global pool → linear classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 32,
        width: int = 32,
        horizon: float = 1.0,
        tied: bool = False,
        stem_stride: int = 1,
        scheme: str = "euler",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 blocks, got {depth}")
        if width < 1 or horizon <= 0:
            raise ValueError(f"width must be >= 1 and horizon > 0, got width={width}, horizon={horizon}")
        self.num_classes = num_classes
        self.num_features = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        step = horizon / depth
        shared = OdeConvBlock(width, step) if tied else None
        blocks = [shared if shared is not None else OdeConvBlock(width, step) for _ in range(depth)]
        self.stage = AdjointSequential(blocks, scheme=scheme, name="stage")
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


@register_model
def ode_resnet(pretrained: bool = False, **kwargs: Any) -> OdeResNet:
    """The paper's ODE-style image ResNet (no pretrained weights: it is trained from scratch)."""
    if pretrained:
        raise ValueError("ode_resnet has no pretrained weights; set pretrained=false (train from scratch)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return OdeResNet(**kwargs)
