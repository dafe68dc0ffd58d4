#!/usr/bin/env python
"""timm ResNets converted by ``to_adjoint`` vs backprop, timm checkpointing and momentumnet: memory and step time.

    python scripts/bench_timm.py            # resnet50/101/152/200: MiB/img at 224x224; time ratio at 8x128x128
    python scripts/bench_timm.py --quick    # resnet50 only, fewer timing pairs

Memory: saved activation bytes of one training forward (docs/design.md: unique storages, parameters excluded),
batch 1 at 224x224, pretrained=False. Time: a training step (forward, backward) as a ratio to plain backprop
in this process, interleaved A B A B after warm-up, median of pairs. momentumnet is optional (the ``bench``
extra); its column reads "n/a" when it does not import.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

from lightning_resode import saved_activation_bytes, to_adjoint


def _momentumnet(model: nn.Module) -> nn.Module | None:
    try:
        from momentumnet import transform_to_momentumnet
    except ImportError:
        return None
    return transform_to_momentumnet(model, gamma=0.9, use_backprop=False)


def variants(name: str) -> dict[str, Callable[[], nn.Module | None]]:
    def plain() -> nn.Module:
        return timm.create_model(name, pretrained=False)

    def timm_checkpointing() -> nn.Module:
        model = plain()
        model.set_grad_checkpointing(True)
        return model

    return {
        "backprop": plain,
        "timm checkpointing": timm_checkpointing,
        "momentumnet": lambda: _momentumnet(plain()),
        "adjoint (default)": lambda: to_adjoint(plain()),
    }


def mib_per_image(model: nn.Module, size: int = 224, batch: int = 1) -> float:
    model.train()
    x = torch.randn(batch, 3, size, size)
    return saved_activation_bytes(model, lambda: model(x)) / batch / 2**20


def _step(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x).float().square().mean().backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def time_ratios(models: dict[str, nn.Module], pairs: int, batch: int = 8, size: int = 128) -> dict[str, float]:
    """Median over interleaved pairs of (variant step time / backprop step time)."""
    x = torch.randn(batch, 3, size, size)
    baseline = models["backprop"]
    for model in models.values():
        model.train()
        _step(model, x)  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in models if name != "backprop"}
    for _ in range(pairs):
        for name in ratios:
            reference = _step(baseline, x)
            ratios[name].append(_step(models[name], x) / reference)
    return {name: statistics.median(values) for name, values in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet50 only, 3 timing pairs")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--time-models", nargs="+", default=["resnet50"], help="models timed (slow on CPU)")
    args = parser.parse_args()
    names = args.models or (["resnet50"] if args.quick else ["resnet50", "resnet101", "resnet152", "resnet200"])
    pairs = args.pairs or (3 if args.quick else 7)
    torch.manual_seed(0)
    columns = list(variants(names[0]))
    print(f"Saved activation MiB per image, 224x224, train mode; step time / backprop at 8x128x128 ({pairs} pairs)\n")
    print("| model | " + " | ".join(f"{c} MiB/img" for c in columns) + " | " + " | ".join(f"{c} time" for c in columns[1:]) + " |")
    print("|---" * (2 * len(columns)) + "|")
    for name in names:
        builders = variants(name)
        models = {variant: build() for variant, build in builders.items()}
        memory = {v: ("n/a" if m is None else f"{mib_per_image(m):.1f}") for v, m in models.items()}
        timed = {v: m for v, m in models.items() if m is not None}
        ratios = time_ratios(timed, pairs) if name in args.time_models else {}
        times = [f"{ratios[v]:.2f}x" if v in ratios else ("n/a" if models[v] is None else "-") for v in columns[1:]]
        print(f"| {name} | " + " | ".join(memory[c] for c in columns) + " | " + " | ".join(times) + " |", flush=True)
        del models, timed


if __name__ == "__main__":
    main()
