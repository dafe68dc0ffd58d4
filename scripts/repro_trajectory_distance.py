"""Finding 1: a ResNet's hidden trajectory approaches its Neural ODE's solution like 1/N only if its weights are
smooth in depth.

For each depth N we run x_{n+1} = x_n + (T/N) tanh(W_n x_n + b_n) and solve dx/dt = tanh(W(t) x + b(t)) with
torchdiffeq's dopri5 at tight tolerances, and report max_n ‖x_n − x(nT/N)‖ / ‖x_0‖ (mean over inputs).
Three weight profiles:
- ``smooth``: W_n = W(n/N) for a smooth path, T = 1 (the paper's ODE regime);
- ``iid``: independent W_n, T = 1; the ODE uses the blocks' weights interpolated linearly in depth;
- ``iid_sqrt``: independent W_n with the usual 1/√N residual scaling (T = √N), same interpolated ODE.

Run: ``python scripts/repro_trajectory_distance.py [--quick|--smoke] [--out DIR]``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib.pyplot as plt
import torch
from torchdiffeq import odeint

from _repro_common import fitted_slope, log_log_axes, run_reproduction, slopes_headline
from lightning_resode.ode_models import depth_weights

NAME = "repro_trajectory_distance"
PROFILES: dict[str, tuple[str, bool]] = {  # label -> (weight profile, residual scaled by 1/sqrt(N))
    "smooth": ("smooth", False),
    "iid": ("iid", False),
    "iid_sqrt": ("iid", True),
}


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...]
    width: int = 8
    samples: int = 32
    seed: int = 0
    rtol: float = 1e-9
    atol: float = 1e-11


CONFIGS = {
    "smoke": Config(depths=(8, 16, 32, 64), samples=8, rtol=1e-7, atol=1e-9),
    "quick": Config(depths=(8, 16, 32, 64, 128, 256)),
    "full": Config(depths=(4, 8, 16, 32, 64, 128, 256, 512), samples=64),
}


def trajectory_distance(depth: int, label: str, config: Config, x0: torch.Tensor) -> float:
    """max over depth of ‖ResNet state − ODE state‖ / ‖x_0‖, averaged over the inputs."""
    profile, sqrt_scaling = PROFILES[label]
    horizon = math.sqrt(depth) if sqrt_scaling else 1.0
    weights = depth_weights(depth, config.width, profile, horizon=horizon, seed=config.seed)
    states = [x0]
    with torch.no_grad():
        for block in weights.blocks():
            states.append(block(states[-1]))
    times = torch.linspace(0.0, horizon, depth + 1, dtype=x0.dtype)
    # The interpolated field has kinks at block times: tell the solver so it does not step across them.
    options = {} if weights.path is not None else {"jump_t": times[1:-1]}
    reference = odeint(
        weights.vector_field(), x0, times, rtol=config.rtol, atol=config.atol, method="dopri5", options=options
    )
    gap = (torch.stack(states) - reference).norm(dim=-1).amax(dim=0) / x0.norm(dim=-1)
    return float(gap.mean())


def run(config: Config) -> dict[str, Any]:
    inputs = torch.Generator().manual_seed(config.seed + 1)
    x0 = torch.randn(config.samples, config.width, dtype=torch.float64, generator=inputs)
    distances = {label: [trajectory_distance(n, label, config, x0) for n in config.depths] for label in PROFILES}
    return {
        "finding": "ResNet-to-ODE trajectory distance vs depth",
        "config": asdict(config),
        "depths": list(config.depths),
        "distance": distances,
        "slope": {label: fitted_slope(config.depths, values) for label, values in distances.items()},
    }


def plot(result: dict[str, Any]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    names = {"smooth": "smooth in depth, 1/N", "iid": "i.i.d., 1/N", "iid_sqrt": "i.i.d., 1/√N"}
    for label, values in result["distance"].items():
        ax.plot(result["depths"], values, "o-", label=f"{names[label]} (slope {result['slope'][label]:.2f})")
    log_log_axes(ax, "depth N", "max_n ‖x_n − x(t_n)‖ / ‖x_0‖", "ResNet vs Neural ODE trajectory")
    ax.legend(fontsize=8)
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_reproduction(argv, __doc__, CONFIGS, run, plot, NAME, slopes_headline)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
