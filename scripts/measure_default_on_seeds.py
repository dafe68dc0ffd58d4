"""How the default (scheme='auto') holds on fixtures trained with other seeds: not a test, a measurement.

    python scripts/measure_default_on_seeds.py --seeds 0 1 2 3 4 [--models resnet50] [--inits zil nozil] [--json out.json]

For each small fixture (trained once per seed and cached like the test fixtures) it repeats what
tests/test_trained_fidelity.py checks: the whole-model gradient cosine of ``to_adjoint(model)`` on batches of
2-3 images after calibrating on the first one (test_tiny_batches_keep_approximations_safe), and on the batch of
32 it calibrated on (test_gradients_on_trained_weights). The promise is a cosine >= 0.99 on each.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from lightning_resode import adjoint_stages, to_adjoint
from lightning_resode.testing import PRETRAIN_CLASSES, digits_split, trained_resnet


def _gradient(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    model.train()
    model.zero_grad()
    torch.manual_seed(0)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def tiny_batches(base: torch.nn.Module, data, generator_seed: int = 3) -> tuple[float, dict[str, str]]:
    converted = to_adjoint(copy.deepcopy(base))  # calibrates on the first batch it trains on: 2 images
    generator = torch.Generator().manual_seed(generator_seed)
    worst = 1.0
    for size in (2, 2, 2, 2, 2, 3, 3, 3):
        idx = torch.randint(0, len(data.train_labels), (size,), generator=generator)
        pair = (data.train_images[idx], data.train_labels[idx])
        worst = min(worst, _cosine(_gradient(converted, pair), _gradient(copy.deepcopy(base), pair)))
    return worst, {n: s.method for n, s in adjoint_stages(converted).items()}


def calibration_batch(base: torch.nn.Module, data) -> float:
    batch = data.train_images[:32], data.train_labels[:32]
    converted = to_adjoint(copy.deepcopy(base), calibration=batch)
    return _cosine(_gradient(converted, batch), _gradient(copy.deepcopy(base), batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--inits", nargs="+", choices=["zil", "nozil"], default=["zil", "nozil"])
    parser.add_argument("--json", default=None)
    options = parser.parse_args()
    data = digits_split(PRETRAIN_CLASSES, 32)
    rows = []
    for model_name in options.models:
        for zero_init_last in [init == "zil" for init in options.inits]:
            for seed in options.seeds:
                start = time.perf_counter()
                fixture = trained_resnet(model_name, zero_init_last, size="small", seed=seed)
                worst, methods = tiny_batches(fixture.model, data)
                row = {
                    "model": model_name, "zero_init_last": zero_init_last, "seed": seed,
                    "held_out_accuracy": fixture.info["held_out_accuracy"],
                    "tiny_batches_worst_cosine": round(worst, 5), "tiny_batches_methods": methods,
                    "calibration_batch_cosine": round(calibration_batch(fixture.model, data), 5),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
