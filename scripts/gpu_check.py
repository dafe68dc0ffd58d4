"""GPU check: memory and speed of plain backprop, timm checkpointing and our default adjoint on one GPU.

For one model (resnet152 at 224², bf16 autocast, channels_last by default) and three ways of training it:

- ``backprop``         timm's model as it is,
- ``timm_checkpoint``  timm's ``set_grad_checkpointing()``,
- ``adjoint``          ``to_adjoint(model)`` with its defaults,

it measures, at one shared batch size, the peak ``torch.cuda.max_memory_allocated`` of a training step and
the images/s (interleaved rounds, median, as docs/design.md asks), then the largest batch each fits (doubling,
then bisection, under a time cap). First, for every gradient method of the library (each tier, the default,
and the two references), the project's peak MiB per image (``lightning_resode.measure.peak_per_image``: the
figure docs/BENCHMARKS.md reports from the CPU; float32, no autocast, so the two are comparable). It writes
``gpu_check.json`` and ``gpu_check.md`` to ``--out``.

Weights are timm's random initialisation (nothing is downloaded); cost and memory do not depend on them.
``--dry-run`` runs the same code on the CPU with a tiny model (resnet10t), 32×32 images, one step per
measurement and contiguous memory, so a test keeps this script working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

METHODS: tuple[str, ...] = ("backprop", "timm_checkpoint", "adjoint")


@dataclass
class Settings:
    model: str
    image_size: int
    batch_size: int
    device: str
    warmup_steps: int
    timed_rounds: int
    steps_per_round: int
    search_cap: int
    search_seconds: float
    budget_seconds: float
    bf16: bool
    channels_last: bool


@dataclass
class MethodResult:
    method: str
    batch_size: int
    peak_mib: float | None
    images_per_s: float
    time_vs_backprop: float | None
    largest_batch: int
    largest_batch_capped: bool
    largest_batch_peak_mib: float | None


def build_model(method: str, settings: Settings) -> nn.Module:
    """The timm model trained the way ``method`` names, on the CPU (moved to the device when measured)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
    model = timm.create_model(settings.model, pretrained=False, num_classes=1000)
    if method == "timm_checkpoint":
        model.set_grad_checkpointing(True)
    elif method == "adjoint":
        from lightning_resode.convert import to_adjoint

        model = to_adjoint(model)
    return model.train()


class _Trainer:
    """One model on the device with a plain SGD optimizer (no state, so the model can move devices)."""

    def __init__(self, model: nn.Module, settings: Settings) -> None:
        self.model, self.settings = model, settings
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self._inputs: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def to(self, device: str) -> "_Trainer":
        self.model.to(device=device, memory_format=self.memory_format)
        self._inputs = None
        return self

    def _batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inputs is None or self._inputs[0] != batch_size:
            self._inputs = None
            size, device = self.settings.image_size, self.settings.device
            images = torch.randn(batch_size, 3, size, size, device=device).to(memory_format=self.memory_format)
            labels = torch.randint(0, 1000, (batch_size,), device=device)
            self._inputs = (batch_size, images, labels)
        return self._inputs[1], self._inputs[2]

    def step(self, batch_size: int) -> None:
        images, labels = self._batch(batch_size)
        device_type = torch.device(self.settings.device).type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.settings.bf16):
            loss = nn.functional.cross_entropy(self.model(images), labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def release_inputs(self) -> None:
        self._inputs = None


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _peak_mib(trainer: _Trainer, batch_size: int, steps: int = 2) -> float | None:
    """Peak allocated memory over ``steps`` training steps (the second has gradients freed and re-made)."""
    device = trainer.settings.device
    if torch.device(device).type != "cuda":  # dry run: exercise the step once, no memory statistics
        trainer.step(batch_size)
        return None
    _free(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        trainer.step(batch_size)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _fits(trainer: _Trainer, batch_size: int) -> tuple[bool, float | None]:
    peak: float | None = None
    try:
        peak = _peak_mib(trainer, batch_size)
        fits = True
    except torch.OutOfMemoryError:
        fits = False
    # the except block is over, so the traceback's frames (and their tensors) are gone before freeing
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.release_inputs()
    _free(trainer.settings.device)
    return fits, peak


def largest_fitting_batch(
    fits: Callable[[int], bool], start: int, cap: int, deadline: float, clock: Callable[[], float] = time.monotonic
) -> tuple[int, bool]:
    """Largest batch in [1, cap] for which ``fits`` holds: double from ``start``, then bisect.

    Returns ``(batch, limited)``; ``limited`` is True when the answer is a lower bound because the search
    hit ``cap`` or ``deadline`` before finding a batch that does not fit. Assumes ``fits`` is monotone.
    """
    if start < 1 or cap < start:
        raise ValueError(f"need 1 <= start <= cap, got start={start}, cap={cap}")
    best, failed = 0, None
    batch = start
    while best < cap:  # doubling phase: find a batch that does not fit
        if clock() > deadline:
            return best, True
        if fits(batch):
            best = batch
            batch = min(batch * 2, cap)
        else:
            failed = batch
            break
    if failed is None:
        return best, True
    low, high = best, failed  # low fits (or 0), high does not
    while high - low > max(1, low // 32):  # bisect to ~3 % resolution
        if clock() > deadline:
            return low, True
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, False


def _timed_rounds(trainers: dict[str, _Trainer], settings: Settings) -> dict[str, list[float]]:
    """Seconds per step of each method, interleaved (A B C A B C …) after warm-up."""
    for trainer in trainers.values():
        for _ in range(settings.warmup_steps):
            trainer.step(settings.batch_size)
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(settings.timed_rounds):
        for name, trainer in trainers.items():
            _sync(settings.device)
            begin = time.perf_counter()
            for _ in range(settings.steps_per_round):
                trainer.step(settings.batch_size)
            _sync(settings.device)
            seconds[name].append((time.perf_counter() - begin) / settings.steps_per_round)
    return seconds


#: per-tier peak per image: the library's methods, its default, and what users would use instead
TIERS: tuple[str, ...] = ("euler_fast", "block_fp16", "block_bf16", "block", "checkpoint", "default", "backprop", "timm_checkpoint")


def tier_peaks(settings: Settings) -> list[dict[str, object]]:
    """Peak MiB per image of each tier (docs/design.md's measure), float32, each model alone on the device."""
    from lightning_resode import ReconstructionError
    from lightning_resode.convert import adjoint_stages, policy_of, to_adjoint
    from lightning_resode.measure import peak_per_image

    size, device = settings.image_size, settings.device
    small, large = (2, 4) if device == "cpu" else (8, 16)
    rows = []
    for tier in TIERS:
        # large residual branches, as in normally trained checkpoints; the reconstruction is measured on ODE-like
        # weights (timm's zero-init), the only ones where it is right (on large ones it refuses: ReconstructionError)
        ode_like = tier == "euler_fast"
        model = timm.create_model(settings.model, pretrained=False, num_classes=1000, zero_init_last=ode_like)
        if tier == "timm_checkpoint":
            model.set_grad_checkpointing(True)
        elif tier == "default":
            model = to_adjoint(model)
        elif tier != "backprop":
            model = to_adjoint(model, scheme=tier, check=False)
        model = model.to(device).train()
        images = lambda b: torch.randn(b, 3, size, size, device=device)  # noqa: E731
        if tier == "default":  # calibrate on a warm-up step, then keep its decisions while measuring
            model(images(small)).float().sum().backward()
            model.zero_grad(set_to_none=True)
            policy_of(model).external = True
        methods = ",".join(stage.method for stage in adjoint_stages(model).values())
        weights = "zero_init_last" if ode_like else "large residuals"
        try:
            result = peak_per_image(model, images, small=small, large=large)
        except ReconstructionError as err:
            rows.append({"method": tier, "peak_mib_per_image": None, "rest_mib_per_image": None, "stages": methods, "weights": weights, "error": type(err).__name__})
            print(f"[gpu_check] {tier}: {type(err).__name__}", flush=True)
        else:
            rows.append({"method": tier, **result.as_dict(), "stages": methods, "weights": weights})
            print(f"[gpu_check] {tier}: {result.mib_per_image:.1f} MiB/img peak, {result.rest_mib_per_image:.1f} at rest", flush=True)
        del model
        _free(device)
    return rows


def run(settings: Settings) -> list[MethodResult]:
    started = time.monotonic()
    trainers = {method: _Trainer(build_model(method, settings), settings) for method in METHODS}

    peaks: dict[str, float | None] = {}
    for name, trainer in trainers.items():  # memory: each model alone on the device
        peaks[name] = _peak_mib(trainer.to(settings.device), settings.batch_size)
        trainer.release_inputs()
        trainer.to("cpu")
        _free(settings.device)
        print(f"[gpu_check] {name}: peak {peaks[name]} MiB at batch {settings.batch_size}", flush=True)

    for trainer in trainers.values():  # speed: all on the device, interleaved
        trainer.to(settings.device)
    seconds = _timed_rounds(trainers, settings)
    for trainer in trainers.values():
        trainer.release_inputs()
        trainer.to("cpu")
    _free(settings.device)

    reference = seconds["backprop"]
    results = []
    for index, (name, trainer) in enumerate(trainers.items()):
        trainer.to(settings.device)
        remaining_methods = len(trainers) - index
        budget_left = settings.budget_seconds - (time.monotonic() - started)
        deadline = time.monotonic() + max(0.0, min(settings.search_seconds, budget_left / remaining_methods))
        peak_at: dict[int, float | None] = {}

        def fits(batch: int, trainer: _Trainer = trainer, peak_at: dict = peak_at) -> bool:
            ok, peak_at[batch] = _fits(trainer, batch)
            print(f"[gpu_check] {name}: batch {batch} {'fits' if ok else 'does not fit'}", flush=True)
            return ok

        largest, capped = largest_fitting_batch(fits, settings.batch_size, settings.search_cap, deadline)
        trainer.to("cpu")
        _free(settings.device)
        ratio = statistics.median(s / r for s, r in zip(seconds[name], reference))
        results.append(
            MethodResult(
                method=name,
                batch_size=settings.batch_size,
                peak_mib=peaks[name],
                images_per_s=settings.batch_size / statistics.median(seconds[name]),
                time_vs_backprop=ratio,
                largest_batch=largest,
                largest_batch_capped=capped,
                largest_batch_peak_mib=peak_at.get(largest),
            )
        )
    return results


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown_table(results: list[MethodResult], settings: Settings, device_name: str) -> str:
    lines = [
        f"GPU check on {device_name}: {settings.model} at {settings.image_size}², "
        f"{'bf16 autocast' if settings.bf16 else 'fp32'}, "
        f"{'channels_last' if settings.channels_last else 'contiguous'}, batch {settings.batch_size} for the "
        "first three columns.",
        "",
        "| method | peak MiB | images/s | time vs backprop | largest batch | peak MiB there |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        largest = f"{'≥' if r.largest_batch_capped else ''}{r.largest_batch}"
        lines.append(
            f"| {r.method} | {_fmt(r.peak_mib)} | {_fmt(r.images_per_s, 1)} | {_fmt(r.time_vs_backprop, 2)}× "
            f"| {largest} | {_fmt(r.largest_batch_peak_mib)} |"
        )
    lines += ["", "≥: the search stopped at its cap or time limit before a batch failed."]
    return "\n".join(lines) + "\n"


def tier_table(tiers: list[dict[str, object]], settings: Settings) -> str:
    lines = [
        f"Peak MiB per image of one training step, {settings.model} at {settings.image_size}², float32 "
        "(docs/design.md's measure: max(kept at backward start / B, slope of the peak in B)):",
        "",
        "| method | weights | peak MiB/img | at rest MiB/img | stages |",
        "|---|---|---|---|---|",
    ]
    for row in tiers:
        if row["peak_mib_per_image"] is None:
            lines.append(f"| {row['method']} | {row['weights']} | {row['error']} | - | {row['stages']} |")
        else:
            lines.append(f"| {row['method']} | {row['weights']} | {row['peak_mib_per_image']:.1f} | {row['rest_mib_per_image']:.1f} | {row['stages']} |")
    return "\n".join(lines) + "\n"


def _environment(settings: Settings) -> dict[str, str]:
    device = torch.device(settings.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device_name": name,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }


def _parse(argv: list[str] | None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke run: tiny model, 32x32, one step")
    parser.add_argument("--model", default=None, help="timm model name [resnet152; dry run: resnet10t]")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--search-cap", type=int, default=None, help="largest batch tried")
    parser.add_argument("--search-seconds", type=float, default=100.0, help="time cap of each batch search")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="whole run, batch searches shrink")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--contiguous", action="store_true", help="no channels_last (the dry run never uses it)")
    args = parser.parse_args(argv)
    if args.dry_run:
        settings = Settings(
            model=args.model or "resnet10t", image_size=args.image_size or 32, batch_size=args.batch_size or 2,
            device="cpu", warmup_steps=0, timed_rounds=1, steps_per_round=1, search_cap=args.search_cap or 4,
            search_seconds=args.search_seconds, budget_seconds=args.budget_seconds,
            # channels_last BatchNorm under bf16 takes a slow path on CPUs: the dry run keeps the default layout
            bf16=not args.fp32, channels_last=False,
        )
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device visible; use --dry-run for the CPU smoke run")
        settings = Settings(
            model=args.model or "resnet152", image_size=args.image_size or 224, batch_size=args.batch_size or 64,
            device="cuda", warmup_steps=3, timed_rounds=5, steps_per_round=5, search_cap=args.search_cap or 8192,
            search_seconds=args.search_seconds, budget_seconds=args.budget_seconds,
            bf16=not args.fp32, channels_last=not args.contiguous,
        )
    if settings.batch_size < 1 or settings.image_size < 32:
        parser.error(f"need batch size >= 1 and image size >= 32, got {settings.batch_size}, {settings.image_size}")
    return settings, args.out


def main(argv: list[str] | None = None) -> int:
    settings, out = _parse(argv)
    if settings.device == "cpu":
        torch.set_num_threads(1)  # a tiny model: one thread is fastest, and fights no one on a shared CPU
    environment = _environment(settings)
    started = time.monotonic()
    tiers = tier_peaks(settings)
    settings.budget_seconds = max(0.0, settings.budget_seconds - (time.monotonic() - started))
    results = run(settings)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": asdict(settings), "environment": environment, "tiers": tiers, "results": [asdict(r) for r in results]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    table = tier_table(tiers, settings) + "\n" + markdown_table(results, settings, environment["device_name"])
    (out / "gpu_check.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
