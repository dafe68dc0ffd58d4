"""Finding 5: training with the adjoint succeeds once the network is deep enough, and Heun gets there with
fewer layers than Euler.

Data: scikit-learn's bundled 8×8 digits (no download), standardized, 70/30 stratified split. Model: one
``AdjointSequential`` of N blocks x ↦ x + (T/N) tanh(W_n x + b_n) on the 64 pixel features, weights
initialised smooth in depth; the logits are the first 10 coordinates of the final state. There is no
trainable embedding or classifier head on purpose: on digits a linear head alone reaches ~95% whatever
gradient the residual stage gets, which would hide the adjoint's errors. Trained with Adam at each depth
with three gradients: exact backprop (Euler forward), the Euler adjoint and the Heun adjoint. A horizon
T > 1 makes each block a sizeable step, so shallow stacks are hard to reverse.

Run: ``python scripts/repro_digits_training.py [--quick|--smoke] [--out DIR]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from _repro_common import run_reproduction
from lightning_resode import AdjointSequential, ReconstructionError
from lightning_resode.ode_models import depth_weights

NAME = "repro_digits_training"
CLASSES = 10
#: label -> (scheme, gradient)
METHODS: dict[str, tuple[str, str]] = {
    "backprop": ("euler", "backprop"),
    "adjoint euler": ("euler", "adjoint"),
    "adjoint heun": ("heun", "adjoint"),
}


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...]
    epochs: int
    seeds: tuple[int, ...] = (0,)
    horizon: float = 6.0
    init_scale: float = 1.5
    learning_rate: float = 1e-2
    batch: int = 64
    #: an adjoint run "succeeds" at a depth when its mean accuracy is within this of backprop's there
    tolerance: float = 0.02


CONFIGS = {
    "smoke": Config(depths=(3, 4, 16), epochs=4),
    "quick": Config(depths=(3, 4, 6, 8, 12, 16), epochs=8, seeds=(0, 1)),
    "full": Config(depths=(3, 4, 6, 8, 12, 16, 24, 32, 48), epochs=12, seeds=(0, 1, 2)),
}


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized train/test tensors (features scaled with training statistics only)."""
    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0, stratify=labels
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 0.1  # constant border pixels have std 0
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(x_train), as_x(x_test), torch.tensor(y_train), torch.tensor(y_test)


def train_once(depth: int, method: str, seed: int, config: Config, data) -> dict[str, Any]:
    """Train one stage; returns test accuracy and whether a reconstruction blew up (training then stops)."""
    x_train, x_test, y_train, y_test = data
    scheme, gradient = METHODS[method]
    torch.manual_seed(seed)
    width = x_train.shape[1]
    weights = depth_weights(
        depth, width, "smooth", horizon=config.horizon, scale=config.init_scale, seed=seed, dtype=torch.float32
    )
    stage = AdjointSequential(weights.blocks(), scheme, gradient=gradient)
    optimizer = torch.optim.Adam(stage.parameters(), lr=config.learning_rate)
    order = torch.Generator().manual_seed(seed)
    diverged = False
    try:
        for _ in range(config.epochs):
            for batch in torch.randperm(len(x_train), generator=order).split(config.batch):
                loss = nn.functional.cross_entropy(stage(x_train[batch])[:, :CLASSES], y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    except ReconstructionError:
        diverged = True  # the engine refused the step; the weights are the last finite ones
    stage.eval()
    with torch.no_grad():
        accuracy = float((stage(x_test)[:, :CLASSES].argmax(dim=1) == y_test).float().mean())
    return {"accuracy": accuracy, "diverged": diverged}


def first_successful_depth(
    depths: Sequence[int], accuracy: Sequence[float], reference: Sequence[float], tolerance: float
) -> int | None:
    """Smallest depth from which the method stays within ``tolerance`` of backprop at every larger depth."""
    found = None
    for depth, acc, ref in reversed(list(zip(depths, accuracy, reference))):
        if acc < ref - tolerance:
            break
        found = depth
    return found


def run(config: Config) -> dict[str, Any]:
    data = digits_split()
    runs = {
        method: {str(n): [train_once(n, method, seed, config, data) for seed in config.seeds] for n in config.depths}
        for method in METHODS
    }
    mean_accuracy = {
        method: [float(np.mean([r["accuracy"] for r in per_depth[str(n)]])) for n in config.depths]
        for method, per_depth in runs.items()
    }
    return {
        "finding": "digits accuracy vs depth: backprop, Euler adjoint, Heun adjoint",
        "config": asdict(config),
        "depths": list(config.depths),
        "runs": runs,
        "mean_accuracy": mean_accuracy,
        "first_successful_depth": {
            method: first_successful_depth(
                config.depths, mean_accuracy[method], mean_accuracy["backprop"], config.tolerance
            )
            for method in METHODS
            if method != "backprop"
        },
    }


def plot(result: dict[str, Any]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    depths = result["depths"]
    for method, means in result["mean_accuracy"].items():
        line = ax.plot(depths, means, "o-", label=method)[0]
        for n in depths:  # individual seeds as faint dots
            seeds = [r["accuracy"] for r in result["runs"][method][str(n)]]
            ax.plot([n] * len(seeds), seeds, ".", color=line.get_color(), alpha=0.35)
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(n) for n in depths])
    ax.set_xlabel("depth N (blocks)")
    ax.set_ylabel("test accuracy")
    config = result["config"]
    ax.set_title(f"digits, horizon T={config['horizon']:g}, {config['epochs']} epochs, {len(config['seeds'])} seed(s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_reproduction(
        argv, __doc__, CONFIGS, run, plot, NAME,
        lambda result: f"first depth where the adjoint matches backprop: {result['first_successful_depth']}",
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
