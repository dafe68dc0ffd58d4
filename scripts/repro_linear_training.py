"""Finding 2: gradient descent on a linear ResNet keeps its weights smooth in depth.

The model is x_{n+1} = x_n + (1/N) W_n x_n, trained by full-batch gradient descent (learning rate scaled by N,
so training time means the same at every depth) to fit y = B x with B close to the identity (small initial
loss, as the paper's theorem assumes). Smoothness of a weight sequence is N · max_n ‖W_{n+1} − W_n‖_F, a
discrete sup-norm of dW/dt: it stays bounded as N grows for weights sampled from a smooth path and grows
like N for i.i.d. weights. The paper proves that gradient descent moves the weights by a smooth-in-depth
increment, so a smooth start stays smooth (and an i.i.d. start keeps its initial roughness, nothing more).

Run: ``python scripts/repro_linear_training.py [--quick|--smoke] [--out DIR]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib.pyplot as plt
import torch

from _repro_common import fitted_slope, run_reproduction, slopes_headline
from lightning_resode.ode_models import DEPTH_PROFILES, depth_weights

NAME = "repro_linear_training"


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...]
    steps: int
    width: int = 4
    samples: int = 64
    learning_rate: float = 0.5  # per unit of depth: the step on W_n is learning_rate * N * dL/dW_n
    init_scale: float = 0.3
    target_scale: float = 0.5
    seed: int = 0


CONFIGS = {
    "smoke": Config(depths=(8, 32, 128), steps=60),
    "quick": Config(depths=(8, 16, 32, 64, 128, 256), steps=300),
    "full": Config(depths=(8, 16, 32, 64, 128, 256, 512), steps=600),
}


def smoothness(weights: torch.Tensor) -> float:
    """N · max_n ‖W_{n+1} − W_n‖_F: bounded in N iff the sequence samples a Lipschitz path."""
    depth = weights.shape[0]
    return float(depth * (weights[1:] - weights[:-1]).flatten(1).norm(dim=1).max())


def _linear_resnet(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    depth = weights.shape[0]
    for weight in weights:
        x = x + x @ weight.T / depth
    return x


def train(depth: int, profile: str, config: Config, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    initial = depth_weights(depth, config.width, profile, scale=config.init_scale, seed=config.seed).weights
    weights = initial.clone().requires_grad_(True)

    def loss_value() -> torch.Tensor:
        return 0.5 * (_linear_resnet(weights, x) - y).pow(2).sum(dim=1).mean()

    losses = []
    for _ in range(config.steps):
        loss = loss_value()
        losses.append(float(loss.detach()))
        (grad,) = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            weights -= config.learning_rate * depth * grad
    final = weights.detach()
    with torch.no_grad():
        final_loss = float(loss_value())
    return {
        "loss_initial": losses[0],
        "loss_final": final_loss,
        "smoothness_initial": smoothness(initial),
        "smoothness_final": smoothness(final),
        "increment_smoothness": smoothness(final - initial),
        "entry_final": final[:, 0, 1].tolist(),
        "entry_initial": initial[:, 0, 1].tolist(),
    }


def run(config: Config) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(config.samples, config.width, generator=gen, dtype=torch.float64)
    a = torch.randn(config.width, config.width, generator=gen, dtype=torch.float64)
    a = a * config.target_scale / config.width**0.5
    y = x @ torch.linalg.matrix_exp(a).T
    runs = {profile: {str(n): train(n, profile, config, x, y) for n in config.depths} for profile in DEPTH_PROFILES}
    smooth_final = [runs["smooth"][str(n)]["smoothness_final"] for n in config.depths]
    iid_final = [runs["iid"][str(n)]["smoothness_final"] for n in config.depths]
    return {
        "finding": "linear ResNets trained by gradient descent stay smooth in depth",
        "config": asdict(config),
        "depths": list(config.depths),
        "runs": runs,
        "smoothness_slope": {
            "smooth": fitted_slope(config.depths, smooth_final),
            "iid": fitted_slope(config.depths, iid_final),
        },
    }


def plot(result: dict[str, Any]) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    depths = result["depths"]
    shown = sorted({depths[0], depths[len(depths) // 2], depths[-1]})
    for ax, profile in zip(axes[:2], ("smooth", "iid")):
        for n in shown:
            run = result["runs"][profile][str(n)]
            t = [k / n for k in range(n)]
            ax.plot(t, run["entry_final"], "-", lw=1, label=f"N={n}, trained")
            ax.plot(t, run["entry_initial"], ":", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_xlabel("depth t = n / N")
        ax.set_ylabel("W_n[0, 1]")
        ax.set_title(f"{profile} init: weights vs depth (dotted: before)")
        ax.legend(fontsize=7)
    ax = axes[2]
    for profile, style in (("smooth", "o-"), ("iid", "s--")):
        for key, label in (("smoothness_initial", "before"), ("smoothness_final", "after")):
            values = [result["runs"][profile][str(n)][key] for n in depths]
            ax.plot(depths, values, style, alpha=1.0 if label == "after" else 0.4, label=f"{profile}, {label}")
        values = [result["runs"][profile][str(n)]["increment_smoothness"] for n in depths]
        ax.plot(depths, values, style[0] + ":", label=f"{profile}, training increment")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth N")
    ax.set_ylabel("N · max_n ‖W_{n+1} − W_n‖")
    ax.set_title("smoothness in depth")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_reproduction(
        argv, __doc__, CONFIGS, run, plot, NAME,
        lambda result: slopes_headline(result, "smoothness_slope", "smoothness slope after training:"),
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
