#!/usr/bin/env python
"""Step time of plain timm and of the converted model, eager and under torch.compile, as ratios in one run.

    python scripts/bench_compile.py                        # resnet50, 8×128², inductor, CPU (or the GPU if present)
    python scripts/bench_compile.py --backend aot_eager --pairs 5 --json out.json

Four ways to train the same weights (timm's ``zero_init_last=False``, as normally trained checkpoints): plain timm
eager, plain timm compiled, the converted model (the default, calibrated first, decisions then fixed) eager, and
compiled. Each is warmed up (compilation excluded), then timed in interleaved rounds (one training step of each
per round); the figure is the median over rounds of each one's time over plain eager's (docs/design.md).
Under torch.compile the converted stages run eagerly (one graph break each); see docs/convert.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import timm
import torch

from lightning_resode import to_adjoint
from lightning_resode.convert import policy_of


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--pairs", type=int, default=7, help="timed rounds")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help='e.g. \'{"channels": [16, 32, 64, 128]}\'')
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    plain = timm.create_model(args.model, zero_init_last=False, **args.model_kwargs).to(device).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    converted = to_adjoint(copy.deepcopy(plain), calibration=x[:16]).train()
    policy_of(converted).external = True  # decisions fixed while timing (calibration is not a training step)
    models = {
        "plain eager": plain,
        "plain compiled": torch.compile(copy.deepcopy(plain), backend=args.backend),
        "converted eager": converted,
        "converted compiled": torch.compile(copy.deepcopy(converted), backend=args.backend),
    }

    def step(model: torch.nn.Module) -> float:
        _sync(device)
        start = time.perf_counter()
        model(x).float().square().mean().backward()
        _sync(device)
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    for model in models.values():  # warm-up: compilation and allocator
        step(model), step(model)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.pairs):
        for name, model in models.items():
            times[name].append(step(model))
    reference = times["plain eager"]
    ratios = {name: statistics.median(t / r for t, r in zip(values, reference)) for name, values in times.items()}
    print(f"{args.model} {args.batch}×{args.size}², {device}, backend {args.backend}; methods {policy_of(converted).methods()}")
    for name, ratio in ratios.items():
        print(f"  {name:20s} {ratio:5.2f}× plain eager  (median step {statistics.median(times[name]) * 1000:.0f} ms)")
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json), "device": device}, "ratios": ratios}, indent=2) + "\n")
    return ratios


if __name__ == "__main__":
    main()
