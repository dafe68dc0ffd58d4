#!/usr/bin/env python
"""Step time of the default (``scheme="auto"``) converted timm ResNet (resnet50 unless ``--model``) as a ratio to plain backprop.

    python scripts/step_time_default.py                       # resnet50, 8 x 128², 9 pairs, both inits
    python scripts/step_time_default.py --model resnet200 --pairs 5
    python scripts/step_time_default.py --pairs 15 --json out.json
    python scripts/step_time_default.py --breakdown --peak-size 224   # what each part of the default costs

``--breakdown`` also times, in the same interleaved pairs, the calibrated default with one of its choices undone
(each a copy with the same weights and decisions otherwise), and with ``--peak-size`` measures each one's peak
MiB per image (``peak_per_image``) at that resolution, so each saving of memory is shown beside its time:

- ``autograd's own graphs``: every stage recomputes with autograd's own graph (``lean_graphs=()``): the time the
  engine's leaner recomputation graphs cost where the policy kept them;
- ``stem kept``: the stem runs plain backprop (its activations kept) instead of recomputing from the image;
- ``every input kept``: ``store_every=None`` on every stage: no deep stage re-runs its runs of steps (on
  resnet50 no stage has runs, so this is the default itself, and the two differ only by the timing's noise);
- ``float32 inputs``: the stages storing 16-bit inputs store them in float32 (``block``): the 16-bit conversions.

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


def _undone(converted: nn.Module, variant: str) -> nn.Module:
    """A copy of the calibrated default with one of its choices undone (``--breakdown``)."""
    copied = copy.deepcopy(converted)
    stages = policy_of(copied).stages if policy_of(copied) is not None else {}
    for stage in stages.values():
        if variant == "autograd's own graphs":
            stage.lean_graphs = ()
        elif variant == "every input kept":
            stage.configure(store_every=None)
        elif variant == "float32 inputs" and stage.gradient == "block":
            stage.configure(block_dtype=None)
    if variant == "stem kept":
        copied.__dict__["_resode_stem_gradient"] = "backprop"  # the stem runner reads this (convert._stem_runner)
    return copied


BREAKDOWN = ("autograd's own graphs", "stem kept", "every input kept", "float32 inputs")


def measure(model_name: str, batch: int, size: int, pairs: int, zero_init_last: bool, breakdown: bool = False, peak_size: int | None = None) -> dict:
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
    variants = {name: _undone(converted, name) for name in (BREAKDOWN if breakdown else ())}
    for _ in range(2):
        _step(plain, images, targets), _step(converted, images, targets), _step(checkpointed, images, targets)
        for model in variants.values():
            _step(model, images, targets)
    ratios, checkpoint_ratios, plain_times, converted_times = [], [], [], []
    variant_ratios: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(pairs):
        a = _step(plain, images, targets)
        b = _step(converted, images, targets)
        c = _step(checkpointed, images, targets)
        plain_times.append(a), converted_times.append(b), ratios.append(b / a), checkpoint_ratios.append(c / a)
        for name, model in variants.items():
            variant_ratios[name].append(_step(model, images, targets) / a)
    peaks = {}
    if peak_size is not None:
        from lightning_resode.measure import peak_per_image

        for name, model in {"default": converted, **variants, "timm checkpointing": checkpointed, "backprop": plain}.items():
            peaks[name] = peak_per_image(model, lambda b: torch.randn(b, 3, peak_size, peak_size)).mib_per_image
    return {
        "variant_ratio_medians": {name: statistics.median(r) for name, r in variant_ratios.items()},
        "peak_size": peak_size, "peaks_mib_per_image": peaks,
        "timm_checkpointing_ratio_median": statistics.median(checkpoint_ratios),
        "model": model_name, "batch": batch, "size": size, "zero_init_last": zero_init_last, "pairs": pairs,
        "methods": policy.methods() if policy is not None else {}, "plain_graphs": {n: sorted(set(LEAN_PARTS) - s.lean_graphs) for n, s in policy.stages.items() if s.lean_graphs != set(LEAN_PARTS)} if policy is not None else {},
        "ratio_median": statistics.median(ratios), "ratios": ratios,
        "backprop_s_median": statistics.median(plain_times), "default_s_median": statistics.median(converted_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a timm ResNet name (random init, nothing downloaded)")
    parser.add_argument("--batch", type=int, default=8, help="images per timed step (>= 2: calibration needs two)")
    parser.add_argument("--size", type=int, default=128, help="image side of the timed steps")
    parser.add_argument("--pairs", type=int, default=9, help="interleaved timed rounds after two warm-up rounds (>= 1)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--breakdown", action="store_true", help="also time the default with each of its choices undone")
    parser.add_argument("--peak-size", type=int, help="also measure each timed model's peak MiB per image at this size")
    parser.add_argument("--inits", nargs="+", choices=("large", "zero"), default=("large", "zero"),
                        help="residual branches as large as a trained checkpoint's (zero_init_last=False) and/or timm's zero-init")
    args = parser.parse_args()
    if args.batch < 2 or args.pairs < 1 or args.size < 32 or (args.peak_size is not None and args.peak_size < 32):
        parser.error(f"--batch must be >= 2, --pairs >= 1, --size and --peak-size >= 32; got --batch {args.batch}, "
                     f"--pairs {args.pairs}, --size {args.size}, --peak-size {args.peak_size}")
    rows = [measure(args.model, args.batch, args.size, args.pairs, init == "zero", args.breakdown, args.peak_size) for init in args.inits]
    for row in rows:
        print(
            f"{row['model']} {row['batch']}x{row['size']}² zero_init_last={row['zero_init_last']}: "
            f"default/backprop = {row['ratio_median']:.3f}, timm checkpointing/backprop = "
            f"{row['timm_checkpointing_ratio_median']:.3f} (median of {row['pairs']} pairs; backprop "
            f"{row['backprop_s_median']:.2f} s, default {row['default_s_median']:.2f} s) methods {row['methods']}, "
            f"autograd's own graphs in {row['plain_graphs'] or 'no stage'}"
        )
        for name, ratio in row["variant_ratio_medians"].items():
            print(f"    default with {name}: {ratio:.3f}")
        for name, peak in row["peaks_mib_per_image"].items():
            print(f"    peak at {row['peak_size']}², {name}: {peak:.2f} MiB/img")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
