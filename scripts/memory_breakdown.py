#!/usr/bin/env python
"""Where the bytes of one training step are: what is kept at rest, per stage and kind, and each stage's working set.

    python scripts/memory_breakdown.py                                   # resnet50, large residuals, block_fp16
    python scripts/memory_breakdown.py --model resnet152 --scheme euler_fast --weights untrained --json out.json
    python scripts/memory_breakdown.py --model resnet152 --store-every none      # every block input kept

At rest: every tensor autograd keeps between forward and backward, found by walking the graph from the loss
(each node's saved tensors; a storage counted once, parameters excluded), attributed to the adjoint node that
keeps it (``StageEntry``: the stage input; ``StageStep``: a stored block input and BatchNorm statistics;
``StageExit``: the stage output or the top step's stored input; ``StageCheckpoint``: the stem's or a stage's
input) or to plain autograd (the head, unconverted modules). Working set: during each stage's backward (the
profiler ranges its nodes open), the highest live bytes above what was live when that stage's backward started,
per image as the slope between batch B and 2B (which cancels the parameter gradients, as the headline measure
does). From the profiler's allocator events at 224² (docs/design.md, "How we measure").
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import timm
import torch

from lightning_resode import to_adjoint

_MIB = 2.0**20


def _saved_tensors(node: object) -> list[torch.Tensor]:
    tensors = []
    saved = getattr(node, "saved_tensors", None)
    if saved is not None:
        try:
            tensors += [t for t in saved if isinstance(t, torch.Tensor)]
        except RuntimeError:
            pass
    for name in dir(node):
        if name.startswith("_saved_"):
            value = getattr(node, name, None)
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, (tuple, list)):
                tensors += [t for t in value if isinstance(t, torch.Tensor)]
    return tensors


def at_rest(loss: torch.Tensor, parameters: set[int]) -> dict[str, int]:
    """Bytes kept for the backward, by kind: walks the autograd graph from ``loss``."""
    seen_nodes, seen_storages = set(), set()
    kinds: dict[str, int] = defaultdict(int)
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        kind = type(node).__name__.removesuffix("Backward")
        tape = getattr(node, "tape", None)
        stage = tape.stage.display_name if tape is not None else "autograd"
        for t in _saved_tensors(node):
            ptr = t.untyped_storage().data_ptr()
            if ptr in parameters or ptr in seen_storages or ptr == 0:
                continue
            seen_storages.add(ptr)
            kinds[f"{stage} / {kind if tape is not None else 'plain autograd'}"] += t.untyped_storage().nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return dict(kinds)


def working_sets(model: torch.nn.Module, images: torch.Tensor) -> tuple[dict[str, int], int]:
    """Per stage, the highest live bytes during its backward above those live when it started; and the peak."""
    from torch.profiler import ProfilerActivity, profile

    loss = model(images).float().square().mean()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    events = list(prof.profiler.kineto_results.events())
    ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for e in events:
        if e.name().startswith("resode::") and e.name().count("::") == 2:
            ranges[e.name().split("::")[1]].append((e.start_ns(), e.end_ns()))
    allocations = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    result: dict[str, int] = {}
    for stage, spans in ranges.items():
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        live = base = peak = 0
        for event in allocations:
            if event.start_ns() < start:
                live += event.nbytes()
                continue
            if event.start_ns() > end:
                break
            if base == 0:
                base = peak = max(live, 1)
            live += event.nbytes()
            peak = max(peak, live)
        result[stage] = peak - base
    total = peak_total = 0
    for event in allocations:
        total += event.nbytes()
        peak_total = max(peak_total, total)
    return result, peak_total


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", choices=["large", "untrained"], default="large")
    parser.add_argument("--scheme", default="block_fp16")
    parser.add_argument("--store-every", default="auto", help="per-block methods: 'auto', 'none' (keep every input) or K")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model, zero_init_last=args.weights == "untrained")
    store_every = None if args.store_every == "none" else args.store_every if args.store_every == "auto" else int(args.store_every)
    to_adjoint(model, scheme=args.scheme, check=False, store_every=store_every).train()
    images = torch.randn(args.batch, 3, args.size, args.size)
    model(images).float().square().mean().backward()  # warm-up
    model.zero_grad(set_to_none=True)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rest = at_rest(model(images).float().square().mean(), parameters)
    model.zero_grad(set_to_none=True)
    work, peak = working_sets(model, images)
    model.zero_grad(set_to_none=True)
    work_double, peak_double = working_sets(model, torch.cat([images, images]))
    work = {stage: work_double[stage] - work[stage] for stage in work}
    peak = peak_double - peak
    per_image = {k: v / args.batch / _MIB for k, v in rest.items()}
    report = {
        "settings": vars(args) | {"json": None if args.json is None else str(args.json)},
        "at_rest_mib_per_image": dict(sorted(per_image.items())),
        "at_rest_total_mib_per_image": sum(per_image.values()),
        "backward_working_set_mib_per_image": {k: v / args.batch / _MIB for k, v in work.items()},
        "backward_peak_above_start_mib_per_image": peak / args.batch / _MIB,
    }
    print(f"{args.model} ({args.weights}), {args.scheme}, {args.batch}×{args.size}²; MiB per image")
    print("| kept at rest | MiB/img |\n|---|---|")
    for key, value in report["at_rest_mib_per_image"].items():
        print(f"| {key} | {value:.2f} |")
    print(f"| **total** | **{report['at_rest_total_mib_per_image']:.2f}** |")
    print(f"\n| backward of | working set above its start, MiB/img (slope {args.batch}→{2 * args.batch}) |\n|---|---|")
    for key, value in report["backward_working_set_mib_per_image"].items():
        print(f"| {key} | {value:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
