"""Finding 3: the adjoint's gradient error shrinks with depth, like 1/N for Euler and 1/N² for Heun.

For each depth N and scheme, one ``lightning_resode.AdjointSequential`` of ODE-style blocks (weights smooth
in depth, float64) computes the parameter gradient of a squared loss twice: with ``gradient="adjoint"`` and
with ``gradient="backprop"`` (exact) on the same weights and batch. Reported: relative L2 error of the
full parameter gradient, the input-reconstruction error ‖x̂_0 − x_0‖/‖x_0‖, and log-log slopes.

Run: ``python scripts/repro_gradient_error.py [--quick|--smoke] [--out DIR]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib.pyplot as plt
import torch

from _repro_common import fitted_slope, log_log_axes, run_reproduction, slopes_headline
from lightning_resode import AdjointSequential
from lightning_resode.ode_models import ode_blocks

NAME = "repro_gradient_error"
SCHEMES: tuple[str, ...] = ("euler", "euler_fast", "heun")


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...]
    width: int = 16
    batch: int = 32
    horizon: float = 1.0
    seed: int = 0


CONFIGS = {
    "smoke": Config(depths=(8, 16, 32, 64)),
    "quick": Config(depths=(4, 8, 16, 32, 64, 128, 256)),
    "full": Config(depths=(4, 8, 16, 32, 64, 128, 256, 512, 1024)),
}


def _parameter_gradient(stage: AdjointSequential, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    stage.zero_grad(set_to_none=True)
    (stage(x) - target).pow(2).sum().backward()
    return torch.cat([p.grad.flatten() for p in stage.parameters()])


def gradient_errors(depth: int, scheme: str, config: Config) -> dict[str, float]:
    gen = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(config.batch, config.width, generator=gen, dtype=torch.float64)
    target = torch.randn(config.batch, config.width, generator=gen, dtype=torch.float64)
    blocks = ode_blocks(depth, config.width, "smooth", horizon=config.horizon, seed=config.seed)
    exact = _parameter_gradient(AdjointSequential(blocks, scheme, gradient="backprop"), x, target)
    stage = AdjointSequential(blocks, scheme, gradient="adjoint", keep_input=True)
    adjoint = _parameter_gradient(stage, x, target)
    return {
        "gradient_error": float((adjoint - exact).norm() / exact.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(adjoint, exact, dim=0)),
        "reconstruction_error": float(stage.last_backward.reconstruction_error),
        "block_forwards_in_backward": stage.last_backward.block_forwards,
    }


def run(config: Config) -> dict[str, Any]:
    per_scheme = {scheme: [gradient_errors(n, scheme, config) for n in config.depths] for scheme in SCHEMES}
    errors = {scheme: [r["gradient_error"] for r in rows] for scheme, rows in per_scheme.items()}
    return {
        "finding": "adjoint gradient error vs depth",
        "config": asdict(config),
        "depths": list(config.depths),
        "gradient_error": errors,
        "reconstruction_error": {s: [r["reconstruction_error"] for r in rows] for s, rows in per_scheme.items()},
        "cosine": {s: [r["cosine"] for r in rows] for s, rows in per_scheme.items()},
        "block_forwards_in_backward": {
            s: [r["block_forwards_in_backward"] for r in rows] for s, rows in per_scheme.items()
        },
        "slope": {scheme: fitted_slope(config.depths, values) for scheme, values in errors.items()},
    }


def plot(result: dict[str, Any]) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for scheme, values in result["gradient_error"].items():
        axes[0].plot(result["depths"], values, "o-", label=f"{scheme} (slope {result['slope'][scheme]:.2f})")
    error_label = "‖g_adjoint − g_backprop‖ / ‖g_backprop‖"
    log_log_axes(axes[0], "depth N", error_label, "parameter-gradient error (float64)")
    for scheme, values in result["reconstruction_error"].items():
        axes[1].plot(result["depths"], values, "o-", label=scheme)
    log_log_axes(axes[1], "depth N", "‖x̂_0 − x_0‖ / ‖x_0‖", "input reconstruction error")
    for ax in axes:
        ax.legend(fontsize=8)
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_reproduction(argv, __doc__, CONFIGS, run, plot, NAME, slopes_headline)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
