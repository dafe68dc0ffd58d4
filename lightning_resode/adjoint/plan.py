"""How one call of a stage gets its gradient: a plan, fixed when the forward starts.

A stage is configured once (its method and options, set by ``to_adjoint`` or the auto policy). Each training
forward resolves that configuration into an immutable :class:`StagePlan`, which the backward then follows:
nothing read later can change what a call does. Two things make a plan differ from the configuration:

- a **measurement override** (:func:`planned`): fidelity checks, the auto policy's calibration and
  ``diagnose`` run some stages with another method, without fallback or keeping the input, by opening a
  context instead of changing the stages. Plans made inside are marked ``measurement`` and the reports of their
  backward are collected by the context (and do not count as the stage's last training backward);
- the **too-few-values rule**: an approximate method is used only where each BatchNorm channel normalises over
  enough values (``min_values_per_channel``: 64 for float16 inputs and reconstructions, 512 for bfloat16 inputs);
  below that the call stores its inputs exactly and its plan says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .methods import get_method, method_of

if TYPE_CHECKING:
    from .report import BackwardReport
    from .stage import AdjointSequential

#: an approximate method (a reconstruction, a 16-bit input) is used only where each BatchNorm channel of the
#: stage normalises over at least this many values (batch × height × width): over fewer, the batch variance can
#: be tiny by chance and divides the input's error up to O(1) (measured: 2 images at 1×1 gave whole-model
#: cosines down to -0.96 with float16 inputs, and NaN with a reconstruction). Where it applies the state is
#: small (e.g. a 1×1 layer4), so storing it exactly costs next to nothing.
MIN_VALUES_PER_CHANNEL = 64
#: bfloat16 inputs round 8x more coarsely than float16 ones (2^-8 against 2^-11) and need 8x the values: on the
#: trained resnet50 fixture, batches of 2-3 at 32x32 (128-192 values at layer1) gave a cosine of 0.984 with them
MIN_VALUES_COARSE = 8 * MIN_VALUES_PER_CHANNEL


def min_values_per_channel(gradient: str, block_dtype: torch.dtype | None) -> int:
    """Values per BatchNorm channel an engine mode needs before its approximation is used (0: it is exact)."""
    if gradient == "block" and block_dtype == torch.bfloat16:
        return MIN_VALUES_COARSE
    if gradient == "adjoint" or (gradient == "block" and block_dtype is not None):
        return MIN_VALUES_PER_CHANNEL
    return 0


#: ``store_every="auto"`` keeps every input of stages shallower than this (from here on, re-running keeps less at
#: rest and holds no more while the stage's backward runs)
AUTO_STORE_EVERY_FROM = 9


def resolve_run_lengths(configured: int | str | None, gradient: str, num_steps: int, kept_cost: int = 1) -> tuple[int, ...] | None:
    """The runs of steps (lengths, bottom first) a ``block`` call keeps the first input of, re-running the rest in
    backward (None: keeps every input).

    An int K: runs of K steps. ``"auto"``: runs that shorten towards the top of the stage, so that what is live
    while the stage's backward re-runs any one run — the kept inputs of the runs below it and the run's re-run
    inputs — is as small as any split allows, then as few inputs kept as possible. ``kept_cost`` is what a kept
    (exact) input costs in re-run (16-bit) inputs: 2 for float16/bfloat16 re-run inputs of a float32 stage.
    """
    if gradient != "block" or configured is None or num_steps < 2:
        return None
    if configured != "auto":
        every = int(configured)
        return tuple(min(every, num_steps - first) for first in range(0, num_steps, every)) if every > 1 else None
    if num_steps < AUTO_STORE_EVERY_FROM:
        return None
    return tuple(_shortening_runs(num_steps, kept_cost))


def _shortening_runs(num_steps: int, kept_cost: int) -> list[int]:
    """Run lengths (bottom first) of least live memory during the backward: run i (from 0) re-runs while the i kept
    inputs below it are live, so it holds ``kept_cost * i + length_i`` units; lengths that drop by ``kept_cost``
    per run make these equal (the top run takes what is left)."""
    best: tuple[tuple[int, int], list[int]] | None = None
    for runs in range(1, num_steps + 1):
        longest = math.ceil((num_steps + kept_cost * runs * (runs - 1) / 2) / runs)
        lengths = [longest - kept_cost * i for i in range(runs - 1)]
        top = num_steps - sum(lengths)
        if top < 1 or any(length < 1 for length in lengths):
            continue
        lengths.append(top)
        held = max(kept_cost * i + length for i, length in enumerate(lengths))
        if best is None or (held, runs) < best[0]:
            best = ((held, runs), lengths)
    assert best is not None  # one run of every step always qualifies
    return best[1]


def _kept_cost(state: torch.Tensor | None, block_dtype: torch.dtype | None) -> int:
    """What a kept (exact) input costs in re-run inputs: 2 where those are 16-bit copies of a float32 state."""
    if state is None or block_dtype is None:
        return 1
    return max(1, state.dtype.itemsize // block_dtype.itemsize)


def values_per_channel(x: torch.Tensor) -> int:
    """How many values a BatchNorm over a state like x normalises each channel over (batch × spatial)."""
    return x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else x.numel()


@dataclass(frozen=True)
class StagePlan:
    """What one call of a stage does for its backward (immutable; see the module docstring)."""

    #: the method this call runs (``lightning_resode.adjoint.methods``) and the one the stage is configured with
    method: str
    configured_method: str
    gradient: str
    scheme: str
    block_dtype: torch.dtype | None
    refine: int
    anchor_every: int | None
    top_step_dtype: torch.dtype | None
    #: ``block``: the runs of steps (lengths, bottom first) whose first input is kept (exactly); the steps above it
    #: are re-run in backward (None: every input kept)
    run_lengths: tuple[int, ...] | None
    #: keep the reconstructed part's exact input (to measure the reconstruction error, or to fall back)
    keep_input: bool
    #: replace a failed approximate gradient by the exact one (instead of raising)
    fallback: bool
    max_reconstruction_error: float
    check_finite: bool
    preserve_rng_state: bool
    #: values per BatchNorm channel of this call's state (None: the stage has no BatchNorm)
    values_per_channel: int | None = None
    #: why ``method`` differs from ``configured_method``
    reason: str | None = None
    #: made under a measurement override (:func:`planned`), not by a training step
    measurement: bool = False

    @property
    def keeps_chain_input(self) -> bool:
        """Whether the exact input of the residual part is kept (a stage with a head always keeps its input)."""
        if self.gradient == "adjoint":
            return self.keep_input or self.fallback
        return self.gradient == "block" and self.block_dtype is not None and self.fallback


    @property
    def run_starts(self) -> tuple[int, ...] | None:
        """``block`` with re-runs: the step whose input each run keeps, bottom first."""
        if self.run_lengths is None:
            return None
        return tuple(sum(self.run_lengths[:i]) for i in range(len(self.run_lengths)))


@dataclass(frozen=True)
class _Override:
    method: str | None = None
    fallback: bool | None = None
    keep_input: bool | None = None


@dataclass
class PlanLog:
    """What the stages under one :func:`planned` context did: their plans and backward reports."""

    plans: dict[int, StagePlan] = field(default_factory=dict)
    reports: dict[int, "BackwardReport"] = field(default_factory=dict)

    def plan(self, stage: "AdjointSequential") -> StagePlan | None:
        """The last plan ``stage`` made inside the context (None if it ran no training forward)."""
        return self.plans.get(id(stage))

    def report(self, stage: "AdjointSequential") -> "BackwardReport | None":
        """The report of ``stage``'s last backward inside the context."""
        return self.reports.get(id(stage))


# stage id -> (override, the logs of the open contexts covering it, innermost last)
_OVERRIDES: contextvars.ContextVar[Mapping[int, tuple[_Override, tuple[PlanLog, ...]]]] = contextvars.ContextVar(
    "lightning_resode_plan_overrides", default={}
)


@contextlib.contextmanager
def planned(
    stages: Iterable["AdjointSequential"] | Mapping[Any, "AdjointSequential"],
    *,
    method: str | None = None,
    methods: Mapping["AdjointSequential | str", str] | None = None,
    fallback: bool | None = None,
    keep_input: bool | None = None,
) -> Iterator[PlanLog]:
    """Within this context, the given stages plan their calls with these settings; yields their plans and reports.

    ``method`` applies to every stage, ``methods`` per stage (it wins; keys are stages, or their names when ``stages``
    is a name -> stage mapping such as ``adjoint_stages(model)``); settings left ``None`` keep the stage's own
    or an enclosing context's. Stages are not modified: this is how measurements (fidelity, calibration,
    ``diagnose``) run a method without switching the stage and restoring it afterwards.
    """
    by_name = dict(stages) if isinstance(stages, Mapping) else {}
    stages = list(by_name.values()) if isinstance(stages, Mapping) else list(stages)
    if methods and any(isinstance(key, str) for key in methods):
        unknown = [key for key in methods if isinstance(key, str) and key not in by_name]
        if unknown:
            raise ValueError(f"planned(methods=...): unknown stage name(s) {unknown}; valid: {list(by_name)} (pass stages as a name -> stage mapping)")
        methods = {(by_name[key] if isinstance(key, str) else key): value for key, value in methods.items()}
    for name in [method, *(methods or {}).values()]:
        if name is not None:
            get_method(name)  # an unknown name fails here, not in the middle of a forward
    log = PlanLog()
    current = dict(_OVERRIDES.get())
    for stage in stages:
        outer, logs = current.get(id(stage), (_Override(), ()))
        wanted = (methods or {}).get(stage, method)
        merged = _Override(
            method=wanted if wanted is not None else outer.method,
            fallback=fallback if fallback is not None else outer.fallback,
            keep_input=keep_input if keep_input is not None else outer.keep_input,
        )
        current[id(stage)] = (merged, (*logs, log))
    token = _OVERRIDES.set(current)
    try:
        yield log
    finally:
        _OVERRIDES.reset(token)


def measuring() -> bool:
    """Whether a measurement context (:func:`planned`) is open: calibration must not start inside one."""
    return bool(_OVERRIDES.get())


def _settings(stage: "AdjointSequential") -> tuple[_Override | None, tuple[PlanLog, ...], str, str, str, torch.dtype | None]:
    """(override, logs, method, scheme, gradient, block dtype) of the stage under the open contexts."""
    override, logs = _OVERRIDES.get().get(id(stage), (None, ()))
    configured = stage.method
    if override is None or override.method is None or override.method == configured:
        return override, logs, configured, stage.scheme, stage.gradient, stage.block_dtype
    spec = get_method(override.method)
    return override, logs, override.method, spec.scheme or stage.scheme, spec.gradient, spec.block_dtype


def planned_gradient(stage: "AdjointSequential") -> str:
    """The engine mode (``adjoint``, ``block``, ``checkpoint``, ``backprop``) the stage's next call will use."""
    return _settings(stage)[4]


def resolve_plan(stage: "AdjointSequential", state: torch.Tensor | None) -> tuple[StagePlan, tuple[PlanLog, ...]]:
    """The plan of one training call of ``stage``, and the measurement logs it reports to.

    ``state`` is the input of the residual part (after the exact head), whose size decides the too-few-values
    rule; None for calls that run exactly anyway (a whole-stage checkpoint).
    """
    override, logs, method, scheme, gradient, block_dtype = _settings(stage)
    configured = stage.method
    values = values_per_channel(state) if state is not None and stage.has_batchnorm() else None
    reason = None
    needed = min_values_per_channel(gradient, block_dtype)
    if values is not None and values < needed:
        # BatchNorm normalises each channel over so few values that its batch variance can be tiny by chance and
        # magnify any error of an approximate input up to O(1); the state is small there, so it is stored exactly
        reason = (
            f"{method} runs as block (exact) for this call: BatchNorm normalises each channel over {values} values "
            f"(< {needed}), too few for an approximate input"
        )
        gradient, block_dtype = "block", None
        method = method_of(gradient, scheme, block_dtype)
    plan = StagePlan(
        method=method,
        configured_method=configured,
        gradient=gradient,
        scheme=scheme,
        block_dtype=block_dtype,
        refine=stage.refine,
        anchor_every=stage.anchor_every,
        top_step_dtype=stage.top_step_dtype,
        run_lengths=resolve_run_lengths(stage.store_every, gradient, stage.num_steps, _kept_cost(state, block_dtype)),
        keep_input=stage.keep_input,
        fallback=stage.fallback,
        max_reconstruction_error=stage.max_reconstruction_error,
        check_finite=stage.check_finite,
        preserve_rng_state=stage.preserve_rng_state,
        values_per_channel=values,
        reason=reason,
    )
    if override is not None:
        changes: dict[str, Any] = {"measurement": True}
        if override.fallback is not None:
            changes["fallback"] = override.fallback
        if override.keep_input is not None:
            changes["keep_input"] = override.keep_input
        plan = replace(plan, **changes)
    for log in logs:
        log.plans[id(stage)] = plan
    return plan, logs
