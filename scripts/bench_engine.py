#!/usr/bin/env python
"""Engine benchmark: saved activation memory, step time and gradient error of each scheme vs depth.

    python scripts/bench_engine.py                 # depths 8 … 1024, markdown tables on stdout
    python scripts/bench_engine.py --quick         # depths 8 … 128, fewer timing pairs
    python scripts/bench_engine.py --json out.json

Memory and time use a conv stack (timm-like blocks with BatchNorm, post-ReLU free); gradient error uses the
ODE-style stack of ``lightning_resode.ode_models`` in float64, whose residuals are smooth in depth. Time is a
ratio against plain backprop measured in this process, interleaved A B A B after warm-up, median of pairs
(docs/design.md, "How we measure").
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lightning_resode import AdjointSequential, saved_activation_bytes
from lightning_resode.ode_models import ode_blocks

VARIANTS: dict[str, dict] = {
    "backprop": dict(scheme="euler", gradient="backprop"),
    "checkpoint": dict(scheme="euler", gradient="checkpoint"),
    "euler": dict(scheme="euler"),
    "euler_fast": dict(scheme="euler_fast"),
    "euler_fast+top_bf16": dict(scheme="euler_fast", top_step_dtype=torch.bfloat16),
    "euler_fast+refine1": dict(scheme="euler_fast", refine=1),
    "euler+anchor16": dict(scheme="euler", anchor_every=16),
    "heun": dict(scheme="heun"),
}


class _ConvBlock(nn.Module):
    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.scale = 1.0 / depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.branch(x)


def _conv_stage(depth: int, channels: int, variant: str) -> AdjointSequential:
    torch.manual_seed(0)
    return AdjointSequential([_ConvBlock(channels, depth) for _ in range(depth)], **VARIANTS[variant])


def _median_ratio(step: Callable[[], None], baseline: Callable[[], None], pairs: int) -> float:
    def timed(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    step(), baseline()  # warm-up
    ratios = [timed(step) / timed(baseline) for _ in range(pairs)]
    return statistics.median(ratios)


def measure_conv(depth: int, variant: str, *, channels: int, size: int, batch: int, pairs: int) -> dict:
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    stage = _conv_stage(depth, variant=variant, channels=channels)
    saved = saved_activation_bytes(stage, lambda: stage(x))
    baseline = _conv_stage(depth, variant="backprop", channels=channels)

    def train_step(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            module(x).square().mean().backward()

        return run

    ratio = _median_ratio(train_step(stage), train_step(baseline), pairs) if pairs else float("nan")
    return {"saved_mib_per_sample": saved / batch / 2**20, "time_ratio": ratio}


def gradient_error(depth: int, variant: str, width: int = 8) -> float:
    blocks = ode_blocks(depth, width)
    x = torch.randn(16, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grad(options: dict) -> torch.Tensor:
        stage = AdjointSequential(copy.deepcopy(blocks), **options)
        stage(x).square().sum().backward()
        return torch.cat([p.grad.flatten() for p in stage.parameters()])

    scheme = VARIANTS[variant]["scheme"]
    exact = grad(dict(scheme=scheme, gradient="backprop"))
    return float((grad(VARIANTS[variant]) - exact).norm() / exact.norm())


def _slope(depths: list[int], errors: list[float]) -> float:
    usable = [(d, e) for d, e in zip(depths, errors) if e > 1e-13]
    if len(usable) < 2:
        return float("nan")
    d, e = zip(*usable)
    return float(np.polyfit(np.log(d), np.log(e), 1)[0])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--quick", action="store_true", help="depths 8…128 and 3 timing pairs")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved timing pairs per cell (0: skip timing)")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.pairs = [d for d in args.depths if d <= 128], min(args.pairs, 3)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    config = {key: value for key, value in vars(args).items() if key != "json"}  # where it was written is no result
    results: dict = {"config": config, "conv": {}, "gradient_error": {}, "slopes": {}}
    for variant in args.variants:
        results["conv"][variant] = {
            d: measure_conv(d, variant, channels=args.channels, size=args.size, batch=args.batch, pairs=args.pairs)
            for d in args.depths
        }
        if variant not in ("backprop", "checkpoint"):
            errors = [gradient_error(d, variant) for d in args.depths]
            results["gradient_error"][variant] = dict(zip(args.depths, errors))
            results["slopes"][variant] = _slope(args.depths, errors)
        print(f"done: {variant}", file=sys.stderr)

    header = "| variant | " + " | ".join(f"N={d}" for d in args.depths) + " |"
    rule = "|---|" + "---|" * len(args.depths)
    print(f"\nSaved activation MiB per sample (conv stack {args.channels}x{args.size}x{args.size}, train mode)\n")
    print(header + "\n" + rule)
    for variant, cells in results["conv"].items():
        print(f"| {variant} | " + " | ".join(f"{c['saved_mib_per_sample']:.3f}" for c in cells.values()) + " |")
    if args.pairs:
        print(f"\nTraining-step time / plain backprop (median of {args.pairs} interleaved pairs, batch {args.batch})\n")
        print(header + "\n" + rule)
        for variant, cells in results["conv"].items():
            print(f"| {variant} | " + " | ".join(f"{c['time_ratio']:.2f}x" for c in cells.values()) + " |")
    print("\nRelative parameter-gradient error vs exact backprop (ODE stack, float64), fitted slope\n")
    print(header[:-1] + "| slope |\n" + rule + "---|")
    for variant, errors in results["gradient_error"].items():
        cells = " | ".join(f"{e:.1e}" for e in errors.values())
        print(f"| {variant} | {cells} | {results['slopes'][variant]:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
