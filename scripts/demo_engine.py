#!/usr/bin/env python
"""A one-minute tour of the engine: memory and gradient fidelity of a deep residual stage, per scheme.

    python scripts/demo_engine.py [--depth 256]
"""

from __future__ import annotations

import argparse
import copy

import torch

from lightning_resode import AdjointSequential, saved_activation_bytes
from lightning_resode.ode_models import ode_blocks

OPTIONS = {
    "backprop (exact)": dict(scheme="euler", gradient="backprop"),
    "checkpoint (exact)": dict(scheme="euler", gradient="checkpoint"),
    "euler": dict(scheme="euler"),
    "euler_fast": dict(scheme="euler_fast"),
    "euler_fast, refine=1": dict(scheme="euler_fast", refine=1),
    "heun": dict(scheme="heun"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    blocks = ode_blocks(args.depth, args.width)
    x = torch.randn(args.batch, args.width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    print(f"ODE-style residual stage: {args.depth} blocks of width {args.width}, float64, batch {args.batch}\n")
    print(f"| {'training mode':<22} | saved KiB | grad cosine vs backprop | grad rel. error |")
    print(f"|{'-' * 24}|-----------|-------------------------|----------------|")
    exact_by_scheme: dict[str, torch.Tensor] = {}
    for label, options in OPTIONS.items():
        stage = AdjointSequential(copy.deepcopy(blocks), **options)
        saved = saved_activation_bytes(stage, lambda: stage(x))
        stage(x).square().sum().backward()
        grad = torch.cat([p.grad.flatten() for p in stage.parameters()])
        scheme = options["scheme"]
        if scheme not in exact_by_scheme:
            reference = AdjointSequential(copy.deepcopy(blocks), scheme=scheme, gradient="backprop")
            reference(x).square().sum().backward()
            exact_by_scheme[scheme] = torch.cat([p.grad.flatten() for p in reference.parameters()])
        exact = exact_by_scheme[scheme]
        cosine = float(torch.nn.functional.cosine_similarity(grad, exact, dim=0))
        error = float((grad - exact).norm() / exact.norm())
        print(f"| {label:<22} | {saved / 1024:9.1f} | {cosine:23.9f} | {error:14.2e} |")
    print("\nThe adjoint keeps only the stage output; backprop keeps every block's activations.")


if __name__ == "__main__":
    main()
