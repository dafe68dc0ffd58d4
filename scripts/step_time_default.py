#!/usr/bin/env python
"""Step time of the default (``scheme="auto"``) converted resnet50 as a ratio to plain backprop.

    python scripts/step_time_default.py                       # resnet50, 8 x 128², 9 pairs, both inits
    python scripts/step_time_default.py --model resnet200 --pairs 5
    python scripts/step_time_default.py --pairs 15 --json out.json

The ratio is what to compare between two versions of the engine (run this script with each on the same
machine): absolute CPU times move with load, a ratio measured in one process, interleaved A B A B after
warm-up and taken as the median of pairs, does not (docs/design.md, "How we measure"). The policy is
calibrated once on the timed batch, then its decisions are fixed (``external``), so the timing is the
steady state of a training run, not its first step. Random init, nothing downloaded: ``zero_init_last=False``
gives residual branches as large as a normally trained checkpoint's, ``True`` gives timm's small ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import timm
import torch
from torch import nn

from lightning_resode import policy_of, to_adjoint
from lightning_resode.adjoint.stage import LEAN_PARTS


def _step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    nn.functional.cross_entropy(model(images), targets).backward()
    return time.perf_counter() - start


def measure(model_name: str, batch: int, size: int, pairs: int, zero_init_last: bool) -> dict:
    torch.manual_seed(0)
    plain = timm.create_model(model_name, num_classes=10, zero_init_last=zero_init_last).train()
    converted = to_adjoint(copy.deepcopy(plain))
    images, targets = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    policy = policy_of(converted)
    if policy is not None:
        policy.calibrate(converted, (images, targets))
        policy.external = True  # decisions fixed: time the steady state
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)  # timm's own: what a user would use instead, timed in the same run
    for _ in range(2):
        _step(plain, images, targets), _step(converted, images, targets), _step(checkpointed, images, targets)
    ratios, checkpoint_ratios, plain_times, converted_times = [], [], [], []
    for _ in range(pairs):
        a = _step(plain, images, targets)
        b = _step(converted, images, targets)
        c = _step(checkpointed, images, targets)
        plain_times.append(a), converted_times.append(b), ratios.append(b / a), checkpoint_ratios.append(c / a)
    return {
        "timm_checkpointing_ratio_median": statistics.median(checkpoint_ratios),
        "model": model_name, "batch": batch, "size": size, "zero_init_last": zero_init_last, "pairs": pairs,
        "methods": policy.methods() if policy is not None else {}, "plain_graphs": {n: sorted(set(LEAN_PARTS) - s.lean_graphs) for n, s in policy.stages.items() if s.lean_graphs != set(LEAN_PARTS)} if policy is not None else {},
        "ratio_median": statistics.median(ratios), "ratios": ratios,
        "backprop_s_median": statistics.median(plain_times), "default_s_median": statistics.median(converted_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = [measure(args.model, args.batch, args.size, args.pairs, zil) for zil in (False, True)]
    for row in rows:
        print(
            f"{row['model']} {row['batch']}x{row['size']}² zero_init_last={row['zero_init_last']}: "
            f"default/backprop = {row['ratio_median']:.3f}, timm checkpointing/backprop = "
            f"{row['timm_checkpointing_ratio_median']:.3f} (median of {row['pairs']} pairs; backprop "
            f"{row['backprop_s_median']:.2f} s, default {row['default_s_median']:.2f} s) methods {row['methods']}, "
            f"autograd's own graphs in {row['plain_graphs'] or 'no stage'}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
