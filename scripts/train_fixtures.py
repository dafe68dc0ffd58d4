#!/usr/bin/env python
"""Train (or find in the cache) the trained-weight fixtures: timm resnet50 / resnet101, both inits, on digits 0–4.

    .venv/bin/python scripts/train_fixtures.py                # size "full" (64x64; minutes each)
    .venv/bin/python scripts/train_fixtures.py --size small   # what the tests use (seconds each)

Prints one line per fixture: held-out accuracy, per-stage residual ratio and ReLU clip fraction, training time.
The cache is ``$LIGHTNING_RESODE_CACHE`` or ``~/.cache/lightning-resode/trained``.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("MKL_CBWR", "AVX2")  # before MKL's first call: the same weights on AVX-512 and AVX2 CPUs

from lightning_resode.testing import MODEL_NAMES, trained_resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the full records as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table of the records")
    args = parser.parse_args()
    records = {}
    for name in args.models:
        for zero_init_last in (True, False):
            fixture = trained_resnet(name, zero_init_last, size=args.size, seed=args.seed)
            info = fixture.info
            stages = ", ".join(
                f"{stage} {s['residual_ratio']:.3f}/{s['clip_fraction']:.3f}" for stage, s in info["stages"].items()
            )
            print(
                f"{name} zero_init_last={zero_init_last} ({args.size}): held-out {100 * info['held_out_accuracy']:.1f} % "
                f"of {info['held_out_images']}; residual ratio / clip fraction: {stages}; "
                f"trained in {info['training_seconds']:.0f} s ({info['training_threads']} thread(s)); {fixture.path.name}",
                flush=True,
            )
            records[f"{name}-{'zil' if zero_init_last else 'nozil'}"] = info
    if args.json:
        print(json.dumps(records, indent=2))
    if args.markdown:
        print(markdown(records))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def markdown(records: dict[str, dict]) -> str:
    """One row per fixture: accuracy, residual ratio and clip fraction per stage, training time."""
    lines = [
        "| fixture | held-out accuracy (digits 0–4) | residual ratio layer1…4 | ReLU clip fraction layer1…4 | training |",
        "|---|---|---|---|---|",
    ]
    for key, info in records.items():
        stages = info["stages"].values()
        ratios = " / ".join(f"{s['residual_ratio']:.3f}" for s in stages)
        clips = " / ".join(f"{s['clip_fraction']:.2f}" for s in stages)
        lines.append(
            f"| {key} | {100 * info['held_out_accuracy']:.1f} % of {info['held_out_images']} | {ratios} | {clips} | "
            f"{info['steps']} steps, {_duration(info['training_seconds'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
