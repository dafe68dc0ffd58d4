#!/usr/bin/env python
"""Peak memory per image, memory at rest, gradient cosine and step time of each way to train a timm ResNet.

    python scripts/bench_timm.py                         # resnet50, resnet152; untrained and large-residual weights
    python scripts/bench_timm.py --models resnet50 --weights trained --time
    python scripts/bench_timm.py --quick                 # resnet50, untrained, a few variants

Variants: plain backprop, timm's ``set_grad_checkpointing``, momentumnet (optional ``bench`` extra), and
``to_adjoint`` with each method (``euler_fast``, ``block_fp16``, ``block_bf16``, ``block``, whole-stage
``checkpoint``) and the default (``scheme="auto"``, calibrated on a warm-up step, excluded from the figures).

Weights: ``untrained`` (timm's initialisation: every residual branch is zero, so every method is exact —
memory only), ``large`` (``zero_init_last=False``: branches as large as the identity, as in normally trained
checkpoints) and ``trained`` (the trained digits fixtures of ``lightning_resode.testing``, resnet50/101 only;
built on first use).

Figures (docs/design.md, "How we measure"): peak MiB per image of one training step at 224² =
max(live at backward start / 8, (peak(8) - peak(4)) / 4) from the profiler's allocator events; MiB per image
kept at rest; whole-model gradient cosine against exact backprop on 8 images; step time as a ratio to
backprop (8×128², interleaved A B A B after warm-up, median of ``--pairs`` pairs).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from lightning_resode import ReconstructionError, adjoint_stages, saved_activation_bytes, to_adjoint
from lightning_resode.convert import policy_of
from lightning_resode.fidelity import calibration_loss, side_effect_free
from lightning_resode.measure import peak_per_image

METHODS = ("euler_fast", "block_fp16", "block_bf16", "block", "checkpoint")


def _momentumnet(model: nn.Module) -> nn.Module | None:
    try:
        from momentumnet import transform_to_momentumnet
    except ImportError:
        return None
    return transform_to_momentumnet(model, gamma=0.9, use_backprop=False)


def base_model(name: str, weights: str) -> nn.Module:
    if weights == "trained":
        from lightning_resode.testing import trained_resnet

        return trained_resnet(name, zero_init_last=False, size="full").model
    return timm.create_model(name, pretrained=False, zero_init_last=weights == "untrained")


def variants(base: nn.Module, calibration: torch.Tensor, quick: bool) -> dict[str, Callable[[], nn.Module | None]]:
    def copy_of() -> nn.Module:
        return copy.deepcopy(base)

    def timm_checkpointing() -> nn.Module:
        model = copy_of()
        model.set_grad_checkpointing(True)
        return model

    out: dict[str, Callable[[], nn.Module | None]] = {
        "backprop": copy_of,
        "timm checkpointing": timm_checkpointing,
    }
    if not quick:
        out["momentumnet"] = lambda: _momentumnet(copy_of())
    for method in (("euler_fast", "block_fp16") if quick else METHODS):
        out[method] = lambda method=method: to_adjoint(copy_of(), scheme=method, check=False)
    if not quick:  # what the re-runs of deep stages (store_every, on by default) trade: memory for a forward
        out["block_fp16, every input kept"] = lambda: to_adjoint(copy_of(), scheme="block_fp16", check=False, store_every=None)
    out["default (auto)"] = lambda: _calibrated_and_fixed(to_adjoint(copy_of(), calibration=calibration))
    return out


def _calibrated_and_fixed(model: nn.Module) -> nn.Module:
    """The default after its calibration, with its decisions fixed for the measurements.

    The measurements run several training forwards; the policy would count them as steps and recheck at
    its early steps (1, 10), and a recheck's own exact reference would then be measured as if it were the
    method's. Calibration is reported separately (its reference is the exact ``block`` method).
    """
    policy = policy_of(model)
    if policy is not None:
        policy.external = True  # the model no longer runs the policy before its forwards
    return model


def rest_mib_per_image(model: nn.Module, size: int = 224, batch: int = 4) -> float:
    model.train()
    x = torch.randn(batch, 3, size, size)
    return saved_activation_bytes(model, lambda: model(x)) / batch / 2**20


def whole_model_cosine(model: nn.Module, reference: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Whole-model gradient cosine against ``reference``; NaN when the method refuses (``ReconstructionError``)."""
    grads = []
    for m in (model, reference):
        params = [p for p in m.parameters() if p.requires_grad]
        with side_effect_free(m):
            torch.manual_seed(0)
            try:
                g = torch.autograd.grad(calibration_loss(m(images), targets), params)
            except ReconstructionError:
                return float("nan")
        grads.append(torch.cat([t.flatten().double() for t in g]))
    return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))


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
    refused = set()
    for name, model in models.items():
        model.train()
        try:
            _step(model, x)  # warm-up (the default calibrated before: not timed)
        except ReconstructionError:  # a reconstruction on weights it cannot invert: no time to report
            model.zero_grad(set_to_none=True)
            refused.add(name)
    ratios: dict[str, list[float]] = {name: [] for name in models if name != "backprop" and name not in refused}
    for _ in range(pairs):
        for name in ratios:
            reference = _step(baseline, x)
            ratios[name].append(_step(models[name], x) / reference)
    return {name: statistics.median(values) for name, values in ratios.items()}


def digits_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_resode.testing import digits_split

    split = digits_split((0, 1, 2, 3, 4), size)
    return split.test_images[:8], split.test_labels[:8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet50, untrained, few variants, no timing")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--weights", nargs="+", default=None, choices=["untrained", "large", "trained"])
    parser.add_argument("--time", action="store_true", help="also time a training step against backprop")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    names = args.models or (["resnet50"] if args.quick else ["resnet50", "resnet152"])
    weight_kinds = args.weights or (["untrained"] if args.quick else ["untrained", "large"])
    torch.manual_seed(0)
    rows = []
    print("| model | weights | variant | peak MiB/img | at rest MiB/img | grad cosine | time / backprop | stages |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        for weights in weight_kinds:
            base = base_model(name, weights)
            num_classes = base.get_classifier().out_features
            images, targets = digits_batch(224) if weights == "trained" else (torch.randn(8, 3, 224, 224), torch.randint(0, num_classes, (8,)))
            built = {v: build() for v, build in variants(base, (images, targets), args.quick).items()}
            models = {v: m for v, m in built.items() if m is not None}
            ratios = time_ratios(models, args.pairs) if args.time else {}
            for variant, model in built.items():
                if model is None:
                    print(f"| {name} | {weights} | {variant} | n/a | n/a | n/a | n/a | momentumnet not installed |")
                    continue
                try:
                    peak = peak_per_image(model, lambda b: torch.randn(b, 3, 224, 224), warmup=False)
                except ReconstructionError:  # a reconstruction on weights it cannot invert: its peak is the untrained one
                    print(f"| {name} | {weights} | {variant} | ReconstructionError | - | - | - | |", flush=True)
                    continue
                rest = rest_mib_per_image(model)
                cosine = 1.0 if variant == "backprop" else whole_model_cosine(model, built["backprop"], images, targets)
                stages = ",".join(s.method for s in adjoint_stages(model).values())
                row = dict(model=name, weights=weights, variant=variant, peak_mib_per_image=peak.mib_per_image,
                           rest_mib_per_image=rest, grad_cosine=cosine, time_ratio=ratios.get(variant), stages=stages,
                           peak_during=peak.peak_during)
                rows.append(row)
                ratio = f"{ratios[variant]:.2f}x" if variant in ratios else "-"
                shown = "ReconstructionError" if math.isnan(cosine) else f"{cosine:.4f}"
                print(f"| {name} | {weights} | {variant} | {peak.mib_per_image:.1f} | {rest:.1f} | {shown} | {ratio} | {stages} |", flush=True)
            del built, models
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
