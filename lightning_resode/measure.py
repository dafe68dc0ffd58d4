"""Memory measured the way users pay for it: the peak of a training step, and what is kept at rest.

Users pay the *peak* live memory of one training step (forward + backward): it decides the batch that
fits. What autograd keeps at rest between forward and backward is a secondary figure: it hides the
backward's working set. Both are measured here, on CPU from the profiler's allocator events and on CUDA
from the caching allocator's counters, so figures are comparable across machines (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

_MIB = 2.0**20
_BACKWARD_MARK = "resode::backward"


def saved_activation_bytes(model: nn.Module, run: Callable[[], object]) -> int:
    """Bytes of unique storages autograd saves during ``run()`` (a training forward), parameters excluded.

    Every tensor kept for backward passes through ``saved_tensors_hooks``' pack hook (adjoint stages save what
    they keep through autograd too); views of one storage count once.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages:
            seen[(str(t.device), ptr)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


@dataclass(frozen=True)
class StepMemory:
    """Live bytes of one training step, counted from what was allocated before it started."""

    #: the maximum of live bytes during forward and backward
    peak_bytes: int
    #: live bytes when backward starts: what the forward keeps for it (plus the loss)
    backward_start_bytes: int
    #: the autograd node or op running when the peak was reached (CPU profiler only; None on CUDA)
    peak_during: str | None = None


def step_memory(loss_fn: Callable[[], torch.Tensor], device: torch.device | str = "cpu") -> StepMemory:
    """Run ``loss_fn()`` then its backward, and report the peak and the at-backward-start live bytes.

    Only allocations made inside the step count (parameters and anything allocated before are excluded;
    parameter gradients allocated by the backward count, so clear ``.grad`` first for comparable figures).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_step_memory(loss_fn, device)
    return _cpu_step_memory(loss_fn)


def _cuda_step_memory(loss_fn: Callable[[], torch.Tensor], device: torch.device) -> StepMemory:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss = loss_fn()
    torch.cuda.synchronize(device)
    at_backward = torch.cuda.memory_allocated(device) - base
    loss.backward()
    del loss
    torch.cuda.synchronize(device)
    return StepMemory(torch.cuda.max_memory_allocated(device) - base, at_backward)


def _cpu_step_memory(loss_fn: Callable[[], torch.Tensor]) -> StepMemory:
    import contextlib
    import os
    import sys

    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    @contextlib.contextmanager
    def native_stderr_silenced():  # noqa: ANN202
        # kineto prints 'USDT: … profiler_start/stop' and, without a GPU, 'ERROR: … gpuGetDeviceCount failed'
        # straight to file descriptor 2 when the profiler starts and stops, with no option to turn them off (its
        # log level is read once, from the environment, when torch loads): point descriptor 2 at /dev/null for
        # those two calls only, so the step itself can still warn
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no descriptor 2 to redirect
            yield
            return
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with native_stderr_silenced():
        prof.__enter__()
    try:
        loss = loss_fn()
        with record_function(_BACKWARD_MARK):
            loss.backward()
        del loss
    finally:
        with native_stderr_silenced():
            prof.__exit__(*sys.exc_info())
    events = list(prof.profiler.kineto_results.events())
    backward_start = min((e.start_ns() for e in events if e.name() == _BACKWARD_MARK), default=None)
    allocations = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = at_backward = 0
    peak_ns = None
    for event in allocations:
        if backward_start is not None and event.start_ns() >= backward_start and at_backward == 0:
            at_backward = max(live, 1)
        live += event.nbytes()
        if live > peak:
            peak, peak_ns = live, event.start_ns()
    if at_backward == 0:
        at_backward = live
    return StepMemory(peak, at_backward, _innermost_range(events, peak_ns))


def _innermost_range(events: list, at_ns: int | None) -> str | None:
    """Name of the shortest profiled range (op or autograd node) enclosing ``at_ns``."""
    if at_ns is None:
        return None
    best = None
    for e in events:
        if e.name() in ("[memory]", _BACKWARD_MARK) or not (e.start_ns() <= at_ns <= e.end_ns()):
            continue
        if "Backward" not in e.name() and best is not None:
            continue
        if best is None or e.duration_ns() < best.duration_ns() or ("Backward" in e.name() and "Backward" not in best.name()):
            best = e
    return None if best is None else best.name()


def training_step_memory(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
) -> StepMemory:
    """``step_memory`` of one training step of ``model`` on ``images`` (cross-entropy, or ``sum`` without targets)."""

    def default_loss(outputs: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            return outputs.float().sum()
        return torch.nn.functional.cross_entropy(outputs.float(), y)

    loss = loss or default_loss
    model.train()
    model.zero_grad(set_to_none=True)
    result = step_memory(lambda: loss(model(images), targets), images.device)
    model.zero_grad(set_to_none=True)
    return result


@dataclass(frozen=True)
class PeakPerImage:
    """Peak MiB per image of a training step: max(kept at backward start / B, slope of the peak in B)."""

    mib_per_image: float
    rest_mib_per_image: float
    slope_mib_per_image: float
    peak_during: str | None

    def as_dict(self) -> dict[str, float | str | None]:
        return {
            "peak_mib_per_image": self.mib_per_image,
            "rest_mib_per_image": self.rest_mib_per_image,
            "slope_mib_per_image": self.slope_mib_per_image,
            "peak_during": self.peak_during,
        }


def peak_per_image(
    model: nn.Module,
    make_images: Callable[[int], torch.Tensor],
    *,
    small: int = 4,
    large: int = 8,
    warmup: bool = True,
    loss: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
) -> PeakPerImage:
    """The project's headline memory figure for ``model`` (docs/design.md, "How we measure").

    ``max(live bytes at backward start / B, (peak(large) - peak(small)) / (large - small))`` per image: the
    first term dominates when much is kept at rest, the second is the backward's working set (the
    difference cancels parameters and their gradients). A warm-up step runs first (a policy may calibrate
    on it).
    """
    if not 0 < small < large:
        raise ValueError(f"need 0 < small < large batch sizes, got small={small}, large={large}")
    if warmup:
        training_step_memory(model, make_images(small), loss=loss)
    low = training_step_memory(model, make_images(small), loss=loss)
    high = training_step_memory(model, make_images(large), loss=loss)
    rest = high.backward_start_bytes / large / _MIB
    slope = (high.peak_bytes - low.peak_bytes) / (large - small) / _MIB
    return PeakPerImage(max(rest, slope), rest, slope, high.peak_during)
