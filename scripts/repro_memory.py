"""Finding 4: saved activation memory grows linearly with depth under backprop and stays flat with the adjoint.

Memory is measured as docs/design.md defines saved bytes at rest (``lightning_resode.saved_activation_bytes``: unique storages
autograd keeps during one training forward, parameters excluded), so the numbers are exact and the same on
any machine. Stacks of N ODE-style blocks (float32) in one ``AdjointSequential`` per gradient mode.

Run: ``python scripts/repro_memory.py [--quick|--smoke] [--out DIR]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib.pyplot as plt
import torch

from _repro_common import fitted_slope, run_reproduction, slopes_headline
from lightning_resode import AdjointSequential, saved_activation_bytes
from lightning_resode.ode_models import ode_blocks

NAME = "repro_memory"
#: label -> (scheme, gradient)
MODES: dict[str, tuple[str, str]] = {
    "backprop": ("euler", "backprop"),
    "checkpoint": ("euler", "checkpoint"),
    "adjoint euler": ("euler", "adjoint"),
    "adjoint euler_fast": ("euler_fast", "adjoint"),
    "adjoint heun": ("heun", "adjoint"),
}


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...]
    width: int = 256
    batch: int = 32


CONFIGS = {
    "smoke": Config(depths=(4, 16, 64)),
    "quick": Config(depths=(4, 8, 16, 32, 64, 128, 256)),
    "full": Config(depths=(4, 8, 16, 32, 64, 128, 256, 512, 1024)),
}


def saved_kib_per_sample(depth: int, scheme: str, gradient: str, config: Config) -> float:
    stage = AdjointSequential(ode_blocks(depth, config.width, "smooth", dtype=torch.float32), scheme, gradient=gradient)
    x = torch.randn(config.batch, config.width, requires_grad=True)
    saved = saved_activation_bytes(stage, lambda: stage(x))
    return saved / config.batch / 1024


def run(config: Config) -> dict[str, Any]:
    kib = {label: [saved_kib_per_sample(n, *mode, config) for n in config.depths] for label, mode in MODES.items()}
    return {
        "finding": "saved activation memory vs depth",
        "config": asdict(config),
        "depths": list(config.depths),
        "saved_kib_per_sample": kib,
        "state_kib_per_sample": config.width * 4 / 1024,
        "slope": {label: fitted_slope(config.depths, values) for label, values in kib.items()},
    }


def plot(result: dict[str, Any]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = ("o-", "s--", "^-.", "v:", "D--")  # the memory-free modes coincide: vary marks so all show
    for (label, values), style, size in zip(result["saved_kib_per_sample"].items(), styles, (7, 9, 7, 5, 3)):
        ax.plot(result["depths"], values, style, markersize=size, label=f"{label} (slope {result['slope'][label]:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth N (blocks in the stage)")
    ax.set_ylabel("saved activations, KiB per sample")
    width, state = result["config"]["width"], result["state_kib_per_sample"]
    ax.set_title(f"activation memory, width {width} (one state = {state:.0f} KiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_reproduction(argv, __doc__, CONFIGS, run, plot, NAME, slopes_headline)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
