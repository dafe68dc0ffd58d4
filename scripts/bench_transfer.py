#!/usr/bin/env python
"""Transfer on trained weights: fine-tune digits-0–4 ResNets on digits 5–9 with backprop, the default and each scheme.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_transfer.py            # full fixtures (64x64), both models, both inits
    .venv/bin/python scripts/bench_transfer.py --quick                      # small fixtures (32x32), fewer steps: minutes
    .venv/bin/python scripts/bench_transfer.py --methods default block --merge   # rerun some methods, keep the rest

Every run starts from the same trained fixture (``lightning_resode.testing.trained_resnet``: timm resnet50 /
resnet101 trained with plain backprop on digits 0–4, with timm's ``zero_init_last=True`` and with ``False``),
gets the same new 5-class head, sees the same batches in the same order and uses the same AdamW settings;
only how the gradient is computed differs:

- ``backprop``: the plain timm model (the reference);
- ``default``: ``to_adjoint(model)`` with no other argument, what a new user writes;
- one run per explicit scheme of ``lightning_resode.convert.SCHEME_CHOICES``, except ``heun`` (a Heun stage is a
  different network from the pretrained Euler ResNet: it changes the function being fine-tuned, not only its
  gradient) and ``backprop`` (the reference already); the scheme that *is* the default runs once, as ``default``.

The learning rate decays to 0 over the run (cosine; ``--schedule constant`` keeps it), so the last evaluation is
of a settled model, and each method runs once per seed (``--seeds``; a seed picks the new head and the batch
order, the same for every method): with one run and a constant rate, rounding-level differences (exact
``block`` vs backprop) moved the final accuracy by several points. Records held-out accuracy every
``--eval-every`` steps (mean over seeds, and each seed's final figure), the whole-model gradient cosine of the
first step against backprop's on the same batch (the lowest over seeds), steps that raised a
``ReconstructionError`` (skipped, weights unchanged), warnings, and seconds per step (informational). Prints
the default's final accuracy minus backprop's per fixture. Writes ``bench_transfer.json`` and
``bench_transfer.png``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lightning_resode import ReconstructionError, to_adjoint  # noqa: E402
from lightning_resode.convert import SCHEME_CHOICES  # noqa: E402
from lightning_resode.testing import MODEL_NAMES, TRANSFER_CLASSES, accuracy, digits_split, trained_resnet  # noqa: E402

INITS = {"zil": True, "nozil": False}
#: Not fine-tuning schemes for a pretrained Euler ResNet (see the module doc).
EXCLUDED = ("heun", "backprop")
PRESETS = {
    "full": {"size": "full", "steps": 100, "batch_size": 16, "eval_every": 10, "seeds": 2, "out": Path("docs/figures")},
    "quick": {"size": "small", "steps": 40, "batch_size": 16, "eval_every": 10, "seeds": 1, "out": Path("runs/bench_transfer_quick")},
}
#: learning-rate schedules: ``cosine`` decays to 0 over the run, so the last evaluation is of a settled model
#: (with a constant rate, single evaluations of these runs swing by several points between steps)
SCHEDULES = ("cosine", "constant")
LR, WEIGHT_DECAY, SEED = 5e-4, 0.05, 0
#: one colour per method in every panel (exact methods dashed: they lie on top of backprop's curve)
STYLES: dict[str, dict[str, Any]] = {
    "backprop": dict(color="black", lw=2.5),
    "default": dict(color="tab:red", lw=2),
    "euler_fast": dict(color="tab:blue", lw=1.2),
    "euler": dict(color="tab:orange", lw=1.2),
    "block_fp16": dict(color="tab:green", lw=1.2),
    "block_bf16": dict(color="tab:purple", lw=1.2),
    "block": dict(color="tab:brown", lw=1.2, ls="--"),
    "checkpoint": dict(color="tab:gray", lw=1.2, ls="--"),
    "auto": dict(color="tab:pink", lw=1.2),
}


def default_scheme() -> str:
    return str(inspect.signature(to_adjoint).parameters["scheme"].default)


def methods_available() -> list[str]:
    """backprop, default, then each explicit scheme this version of the library has (minus the excluded ones)."""
    default = default_scheme()
    schemes = [s for s in SCHEME_CHOICES if s not in EXCLUDED and s != default]
    return ["backprop", "default", *schemes]


def _convert(model: nn.Module, method: str, first_batch: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    if method == "backprop":
        return model
    if method == "default":
        return to_adjoint(model)
    if method == "auto" and "calibration" in inspect.signature(to_adjoint).parameters:
        return to_adjoint(model, scheme="auto", calibration=first_batch)
    return to_adjoint(model, scheme=method)


def _flat_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad).detach().flatten().double().clone() for n, p in model.named_parameters()}


def _cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    names = sorted(b)
    return float(F.cosine_similarity(torch.cat([a[n] for n in names]), torch.cat([b[n] for n in names]), dim=0))


def _batches(n: int, batch_size: int, steps: int, seed: int = SEED) -> list[torch.Tensor]:
    """The index batches of every run of one seed (fixed order, reshuffled each epoch)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out.extend(perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out[:steps]


def fine_tune(
    base: nn.Module, method: str, data: Any, *, steps: int, batch_size: int, eval_every: int, reference_grad: dict | None,
    seed: int = SEED, schedule: str = "cosine",
) -> dict[str, Any]:
    """Fine-tune a copy of ``base`` (new head already in place) with ``method``; the accuracy curve and records."""
    model = copy.deepcopy(base)
    batches = _batches(len(data.train_labels), batch_size, steps, seed)
    first = (data.train_images[batches[0]], data.train_labels[batches[0]])
    caught: list[str] = []
    failed: list[int] = []
    curve_steps, curve_acc = [0], [accuracy(model, data.test_images, data.test_labels)]
    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model = _convert(model, method, first)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if schedule == "cosine" else None
        first_cosine = None
        start = time.perf_counter()
        for step, idx in enumerate(batches, start=1):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            try:
                F.cross_entropy(model(data.train_images[idx]), data.train_labels[idx]).backward()
            except ReconstructionError as err:  # no update this step; the curve still gets its point
                failed.append(step)
                if len(failed) == 1:
                    caught.append(f"step {step}: {type(err).__name__}: {err}")
            else:
                if step == 1 and reference_grad is not None:
                    first_cosine = _cosine(_flat_grads(model), reference_grad)
                optimizer.step()
            if decay is not None:
                decay.step()
            if step % eval_every == 0 or step == steps:
                curve_steps.append(step)
                curve_acc.append(accuracy(model, data.test_images, data.test_labels))
        seconds = time.perf_counter() - start
    policy = _policy(model)
    for record in records:
        text = f"{record.category.__name__}: {record.message}"
        if text not in caught and len(caught) < 6:
            caught.append(text)
    return {
        "steps": curve_steps,
        "accuracy": curve_acc,
        "final_accuracy": curve_acc[-1],
        "first_step_grad_cosine": first_cosine,
        "failed_steps": len(failed),
        "first_failed_step": failed[0] if failed else None,
        "messages": caught,
        "seconds_per_step": round(seconds / steps, 3),
        # what the stage policy (auto, or the check of an explicit method) ended with, where there is one
        "stage_methods": None if policy is None else policy.methods(),
        "exact_fallbacks": None if policy is None else policy.fallbacks,
    }


def _policy(model: nn.Module) -> Any:
    try:
        from lightning_resode.convert import policy_of
    except ImportError:  # a version of the library without stage policies
        return None
    return policy_of(model)


def _with_new_head(model: nn.Module, classes: int, seed: int = SEED) -> nn.Module:
    model = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_classifier(classes)
    return model


def _reference_gradient(base: nn.Module, data: Any, batch_size: int, seed: int = SEED) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base).train()
    idx = _batches(len(data.train_labels), batch_size, 1, seed)[0]
    torch.manual_seed(seed)
    F.cross_entropy(model(data.train_images[idx]), data.train_labels[idx]).backward()
    return _flat_grads(model)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def plot(result: dict[str, Any], path: Path) -> None:
    runs = result["runs"]
    keys = list(runs)
    cols = 2
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for method, run in runs[key]["methods"].items():
            style = STYLES.get(method, dict(lw=1.2))
            label = method + (f" ({run['failed_steps']} failed steps)" if run["failed_steps"] else "")
            ax.plot(run["steps"], [100 * a for a in run["accuracy"]], marker=".", label=label, **style)
        fixture = runs[key]["fixture"]
        ax.set_title(f"{key} (pretrained: {100 * fixture['held_out_accuracy']:.1f} % on 0–4)")
        ax.set_xlabel("fine-tuning step on digits 5–9")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    """Rows: methods; columns: fixtures; cells: final accuracy, mean of the last three evaluations, first-step cosine."""
    runs = result["runs"]
    order = {m: i for i, m in enumerate(methods_available())}
    methods = sorted(dict.fromkeys(m for run in runs.values() for m in run["methods"]), key=lambda m: order.get(m, len(order)))
    lines = ["| method | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for method in methods:
        cells = []
        for run in runs.values():
            r = run["methods"].get(method)
            if r is None:
                cells.append("–")
                continue
            tail = r["accuracy"][-3:]
            cos = r["first_step_grad_cosine"]
            text = f"{100 * r['final_accuracy']:.1f} / {100 * sum(tail) / len(tail):.1f}" + ("" if cos is None else f" ({cos:.4f})")
            cells.append(text + (f" [{r['failed_steps']} failed]" if r["failed_steps"] else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small fixtures (32x32) and fewer steps: minutes on 2 cores")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--inits", nargs="+", choices=list(INITS), default=list(INITS))
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {methods_available()}")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="runs per method, each with its own head and batch order (averaged)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning rate over the run (default: cosine to 0)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_transfer.json / .png")
    parser.add_argument("--merge", action="store_true", help="keep the runs already in the output JSON that are not rerun")
    args = parser.parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "full"])
    steps = args.steps or preset["steps"]
    eval_every = args.eval_every or preset["eval_every"]
    seeds = args.seeds or preset["seeds"]
    out = args.out or preset["out"]
    available = methods_available()
    methods = args.methods or available
    unknown = [m for m in methods if m not in available]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; this version of the library has {available}")
    if steps < 1 or eval_every < 1 or seeds < 1:
        parser.error(f"--steps, --eval-every and --seeds must be >= 1, got {steps}, {eval_every} and {seeds}")

    json_path = out / "bench_transfer.json"
    result: dict[str, Any] = {"runs": {}}
    if args.merge and json_path.exists():
        result = json.loads(json_path.read_text())
    config = {
        "size": preset["size"], "steps": steps, "batch_size": preset["batch_size"], "eval_every": eval_every,
        "lr": LR, "schedule": args.schedule, "weight_decay": WEIGHT_DECAY, "optimizer": "AdamW",
        "seeds": list(range(SEED, SEED + seeds)), "classes": list(TRANSFER_CLASSES),
        "default_scheme": default_scheme(), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    protocol = ("size", "steps", "batch_size", "schedule", "seeds", "lr", "weight_decay")
    old = result.get("config", {})
    differs = [k for k in protocol if k in old and old[k] != config[k]] + [k for k in protocol if old and k not in old]
    if result["runs"] and differs:
        parser.error(f"--merge: {json_path} holds runs made with other settings ({', '.join(differs)}); write to another --out")
    result["config"] = config
    commit = _commit()
    for name in args.models:
        for init in args.inits:
            fixture = trained_resnet(name, INITS[init], size=preset["size"])
            data = digits_split(TRANSFER_CLASSES, fixture.info["recipe"]["image_size"])
            bases = [_with_new_head(fixture.model, len(TRANSFER_CLASSES), seed) for seed in config["seeds"]]
            references = [_reference_gradient(b, data, preset["batch_size"], seed) for b, seed in zip(bases, config["seeds"])]
            key = f"{name} {init}"
            entry = result["runs"].setdefault(key, {"methods": {}})
            entry["fixture"] = {k: fixture.info[k] for k in ("held_out_accuracy", "recipe_hash", "stages")}
            for method in methods:
                per_seed = [
                    fine_tune(
                        base, method, data, steps=steps, batch_size=preset["batch_size"], eval_every=eval_every,
                        reference_grad=reference, seed=seed, schedule=args.schedule,
                    )
                    for base, reference, seed in zip(bases, references, config["seeds"])
                ]
                run = _over_seeds(per_seed)
                run["commit"] = commit
                entry["methods"][method] = run
                order = {m: i for i, m in enumerate(available)}  # one column order, however the runs were merged
                entry["methods"] = dict(sorted(entry["methods"].items(), key=lambda kv: order.get(kv[0], len(order))))
                cos = run["first_step_grad_cosine"]
                print(
                    f"{key} {method}: held-out {100 * run['final_accuracy']:.1f} % after {steps} steps (mean of {seeds} seeds: "
                    f"{', '.join(f'{100 * a:.1f}' for a in run['final_accuracy_per_seed'])}); lowest first-step cosine "
                    f"{'n/a' if cos is None else f'{cos:.4f}'}; failed steps {run['failed_steps']}; {run['seconds_per_step']} s/step",
                    flush=True,
                )
                out.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(result, indent=2) + "\n")  # after every run: a long job keeps its partial results
    plot(result, out / "bench_transfer.png")
    print("\nheld-out accuracy %: final / mean of the last 3 evaluations (first-step gradient cosine vs backprop):\n" + table(result))
    gaps = default_gaps(result)
    if gaps:
        print("\nthe default's final accuracy minus backprop's (points, mean over seeds): "
              + "; ".join(f"{k} {g:+.1f}" for k, g in gaps.items()))
    return result


def _over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One record per method: curves and final accuracy averaged over seeds, the worst first-step cosine."""
    first = per_seed[0]
    cosines = [r["first_step_grad_cosine"] for r in per_seed if r["first_step_grad_cosine"] is not None]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        **first,
        "accuracy": [mean(col) for col in zip(*(r["accuracy"] for r in per_seed))],
        "final_accuracy": mean([r["final_accuracy"] for r in per_seed]),
        "final_accuracy_per_seed": [r["final_accuracy"] for r in per_seed],
        "first_step_grad_cosine": min(cosines) if cosines else None,
        "failed_steps": sum(r["failed_steps"] for r in per_seed),
        "seconds_per_step": round(mean([r["seconds_per_step"] for r in per_seed]), 3),
        "per_seed": [{k: r[k] for k in ("accuracy", "first_step_grad_cosine", "failed_steps", "stage_methods", "exact_fallbacks")} for r in per_seed],
    }


def default_gaps(result: dict[str, Any]) -> dict[str, float]:
    """Points by which the default's final accuracy (mean over seeds) differs from backprop's, per fixture."""
    gaps = {}
    for key, entry in result["runs"].items():
        methods = entry["methods"]
        if "default" in methods and "backprop" in methods:
            gaps[key] = 100 * (methods["default"]["final_accuracy"] - methods["backprop"]["final_accuracy"])
    return gaps


if __name__ == "__main__":
    main()
