"""The auto policy: per stage, the method with the lowest peak memory whose gradient is measurably right.

A normally trained checkpoint is not ODE-like (large residuals, a ReLU after each sum): reconstructing its
activations backwards gives wrong gradients on some stages and fine ones on others, and which is which
depends on the weights. So it is measured, on the model's own training batches:

1. *Calibration* (the first training step with at least two images, again after 1, 10 and 100 steps —
   fine-tuning moves the weights fastest at the start — then every ``recheck_every`` steps): on up to
   ``sample_images`` images of the batch,
   the exact gradient (every stage with the exact ``block`` method) is the reference. Stages are decided from
   the output side down, each with the stages above already set, trying the methods of ``AUTO_CANDIDATES``
   from the least peak memory to the most — measured on the model and the calibration images, every stage
   running the method (which is least depends on the model: a reconstruction keeps least at rest, a 16-bit
   block's backward needs less, and depth weighs the stored inputs); the first whose stage *and* whole-model gradient cosine keep
   within a quarter of the allowed error for a reconstruction (1 - cosine <= (1 - ``min_cosine``) / 4, a
   margin so that batches the calibration did not see stay above ``min_cosine``), half of it for 16-bit
   inputs, wins. A reconstruction depends on the batch's statistics, so it must also pass on each half of the
   batch and on two pairs of its images (an epoch's last batch can be that small), so it needs at least 4
   calibration images. A method the engine would
   run exactly on these images (too few values per BatchNorm channel) is not measurable and skipped.
   ``block`` (exact) always qualifies. At a recheck whose images are too few to measure the approximation a stage
   runs (an epoch's last batch of 2), the stage keeps it: the engine stores a 16-bit input exactly where BatchNorm
   sees too few values, and a reconstruction was verified on pairs of images when it was chosen.
   With ``backprop_where_free``, then, from the output side down, a stage runs
   plain backprop where that does not raise the step's peak memory per image, measured on the calibration images (its graph is freed
   before the larger stages below start their backward): no recomputation there, for no memory. Last, from the
   output side down, a stage recomputes with autograd's own graph instead of the engine's leaner one
   (``AdjointSequential.lean_graphs``) where the leaner one lowers that measured peak by 3 % or less (the same
   gradient, less time: the leaner graphs save memory in high-resolution stages, and cost time wherever they run;
   the steps of a reconstruction reusing the step above's block output stay lean: they decide its top step).
2. *Between calibrations*, stages using a reconstruction measure their reconstruction error at the stage
   input every step (free where the stage has an exact head). If it grows past a bound set at calibration,
   or a reconstruction turns non-finite, that step's gradient is recomputed exactly (no
   ``ReconstructionError`` reaches the user) and the stage is recalibrated at the next step.
3. Every decision is kept in ``decisions`` (and logged with the ``logging`` module), with its reason.

An explicit method (``to_adjoint(model, scheme="euler_fast")``) is never changed, but it is checked once
the same way, and a stage whose gradient cosine is below ``min_cosine`` gets a loud warning.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .adjoint import MIN_VALUES_PER_CHANNEL, AdjointError, AdjointSequential, BackwardReport, ReconstructionError, measuring, min_values_per_channel, planned
from .adjoint.methods import METHODS, Method, get_method
from .adjoint.stage import LEAN_PARTS
from .fidelity import calibration_loss, compare, exact_gradients, exact_reference, gradients, no_fallback, side_effect_free, split_batch, unique_params

log = logging.getLogger("lightning_resode.policy")

#: What auto tries, in this order where step peaks tie (it orders them by the peak it measures on the model and the
#: calibration images: ``StagePolicy._candidates_by_peak``). A pretrained timm ResNet *is* an Euler network,
#: so only Euler reconstructions; float16 inputs before bfloat16 (same memory, 8x finer rounding, bfloat16
#: only when float16 overflows); ``block`` is exact and always qualifies.
AUTO_CANDIDATES: tuple[str, ...] = ("euler_fast", "euler", "block_fp16", "block_bf16", "block")
#: the reconstruction error bound between calibrations: this many times the calibrated error, at least the floor
ERROR_GROWTH = 4.0
ERROR_FLOOR = 1e-3
#: a method is chosen when its measured error (1 - cosine) is at most this fraction of the allowed one:
#: batches the calibration did not see vary (measured on trained resnet50/101: a quarter keeps them above)
SAFETY_MARGIN = 0.25
#: the same for 16-bit stored inputs: their error is rounding, a sum of many small independent errors that
#: varies little from batch to batch once BatchNorm sees enough values per channel (the engine stores the
#: input exactly where it does not), unlike a reconstruction's, which depends on the batch's statistics
ROUNDING_MARGIN = 0.5
#: the engine's leaner recomputation graphs are kept only where each lowers the step's measured peak by more than
#: this fraction: below it, the time they cost (on the CPU up to a quarter of backprop's step) buys too little
LEAN_PEAK_TOLERANCE = 0.03
#: how a policy decision names the parts of ``LEAN_PARTS`` it recomputes with autograd's own graphs
_PART_NAMES = {"head": "the head", "head_recompute": "the head's k×k convolutions (outputs kept, not recomputed)", "steps": "the steps"}
#: ``backprop_where_free``: a stage runs plain backprop where that raises the step's measured peak by at most this
#: fraction (allocator rounding and the loss's own buffers move a peak by well under 1 %)
FREE_PEAK_TOLERANCE = 0.01
#: candidates whose measured step peaks differ by at most this fraction keep their given order (allocator rounding
#: and the loss's own buffers move a peak by well under 1 %)
PEAK_TIE = 0.02
#: early rechecks (in training steps), before the regular ``recheck_every``
EARLY_RECHECKS = (1, 10, 100)
#: check mode: how many times a stage that ran exactly at the check (too few values per BatchNorm channel) and later
#: ran its method re-arms the check (batch sizes that alternate cannot make it measure at every step)
MAX_CHECK_ATTEMPTS = 3


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    """Images the model's first convolution cannot take, named before a calibration slices them (torch's own error
    then quotes a half batch the user never passed)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return
    if images.dim() != 4 or images.shape[1] != first.in_channels:
        raise ValueError(
            f"images of shape {tuple(images.shape)}: this model takes (batch, {first.in_channels}, height, width) "
            f"images (its first convolution has {first.in_channels} input channels)"
        )


def _class_count(model: nn.Module) -> int | None:
    """Outputs of a timm model's classifier (not ``num_classes``, which a hand-replaced head leaves stale)."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    return head.out_features if isinstance(head, nn.Linear) and head.out_features > 0 else None


def _unmeasurable(spec: Method, values: int | None, images: torch.Tensor) -> str | None:
    """Why these calibration images cannot measure method ``spec`` on a stage whose BatchNorm sees ``values`` values per
    channel, or None. Too few values: the engine would run it exactly here, so what it does on larger batches is not
    measured. Under 4 images for a reconstruction: it depends on the batch's statistics, so it must also hold on each
    half of the batch and on pairs of images (a training batch can be that small: an epoch's last)."""
    needed = min_values_per_channel(spec.gradient, spec.block_dtype)
    if values is not None and values < needed:
        return f"not measurable ({values} < {needed} values per channel)"
    if spec.gradient == "adjoint" and images.shape[0] < 4:
        return f"not verifiable on {images.shape[0]} images (its halves and pairs need 4)"
    return None


def _worst(a: float, b: float) -> float:
    """The lower of two cosines, NaN if either is (``min(1.0, nan)`` is 1.0: a probe whose gradients overflowed
    would pass)."""
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


def _stored_input_methods_other_than(methods: list[str]) -> str:
    """The stored-input methods to advise, never one that was just found wanting."""
    return ", ".join(repr(m) for m in ("block_fp16", "block") if m not in methods)


def _step_peak(model: nn.Module, stages: dict[str, AdjointSequential], methods: dict[str, str], images: torch.Tensor) -> float:
    """Peak MiB per image of a training step with these methods (fallback on, as training runs them), as the
    slope between half the images and all of them: what the parameters and their gradients cost does not scale with
    the batch, so it cannot hide a stage's activations the way it does on a small calibration batch. ``.grad``
    of every parameter untouched (frozen ones included)."""
    from .measure import peak_per_image

    params = list(model.parameters())  # frozen ones too: a measured step sets every .grad to None
    saved = [p.grad for p in params]
    try:
        with planned(stages, methods={stages[n]: m for n, m in methods.items()}, fallback=True):
            torch.manual_seed(0)
            return peak_per_image(model, lambda b: images[:b], small=images.shape[0] // 2, large=images.shape[0], warmup=False, loss=calibration_loss).mib_per_image
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


def _steps_decide_the_gradient(method: str) -> bool:
    """Whether a stage's lean steps change its gradient: a reconstruction reusing the block output of the step above
    (``uses_cache``) reverses its top step by its own block where its steps are lean (one state less held)."""
    from .adjoint.schemes import get_scheme

    spec = get_method(method)
    return spec.gradient == "adjoint" and get_scheme(spec.scheme).uses_cache


def _storage_of(method: str) -> tuple[str, Any]:
    """What decides a method's memory: a reconstruction's scheme, or a block's stored bytes per value."""
    spec = get_method(method)
    if spec.gradient == "block":
        return ("block", spec.block_dtype.itemsize if spec.block_dtype is not None else 4)
    return (spec.gradient, spec.scheme)


def check_policy_options(scheme: str, min_cosine: float, recheck_every: int) -> None:
    """Reject bad policy settings early, naming the value (for every scheme, not only when a policy is made)."""
    from .adjoint.methods import SCHEME_CHOICES

    if scheme not in SCHEME_CHOICES:
        raise ValueError(f"unknown scheme {scheme!r}; valid: {list(SCHEME_CHOICES)}")
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine}")
    if recheck_every < 0:
        raise ValueError(f"recheck_every must be >= 0 (0: never), got {recheck_every}")


@dataclass
class PolicyDecision:
    """One stage's method and why (one row of the policy's log)."""

    stage: str
    method: str
    step: int
    grad_cosine: float
    model_grad_cosine: float
    reason: str
    #: the reconstruction error at calibration (None for stored-input methods)
    reconstruction_error: float | None = None
    #: the stage's parts that recompute with the engine's leaner graphs (``AdjointSequential.lean_graphs``)
    lean_graphs: tuple[str, ...] = LEAN_PARTS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StagePolicy:
    """Measures and sets the methods of some converted stages of one model (see module docstring).

    Args:
        stages: the stages it manages, by public name, input side first.
        mode: ``"auto"`` picks methods; ``"check"`` only measures the methods as set, and warns.
        min_cosine: the gradient fidelity every method must reach (stage and whole model).
        recheck_every: recalibrate every this many training steps (0: only at the first step and after a
            fallback).
        sample_images: images of a batch used to calibrate.
        candidates: methods auto may use; tried from the least measured step peak (this order where peaks tie).
        backprop_where_free: after choosing, give a stage plain backprop (no recomputation) where its autograd
            graph fits under the step's peak, measured on the calibration batch (from the output side down).
    """

    stages: dict[str, AdjointSequential]
    mode: str = "auto"
    min_cosine: float = 0.99
    recheck_every: int = 500
    sample_images: int = 16
    candidates: tuple[str, ...] = AUTO_CANDIDATES
    backprop_where_free: bool = False
    decisions: list[PolicyDecision] = field(default_factory=list)
    step: int = 0
    #: ``sync(settings or None) -> settings``: every process runs the leader's methods and graph forms (set under DDP)
    sync: Callable[[dict[str, tuple[str, tuple[str, ...]]] | None], dict[str, tuple[str, tuple[str, ...]]]] | None = None
    #: this process measures (rank 0); the others only receive the decisions through ``sync``
    leader: bool = True
    #: the caller runs ``before_step`` itself with real targets (the Lightning module); the model's forward
    #: pre-hook (``attach``) then does nothing
    external: bool = False
    #: how many backward passes replaced an approximate gradient by the exact one
    fallbacks: int = 0
    #: stages whose method was fixed from outside (``pin``), e.g. by the gradient-fidelity callback
    pinned: dict[str, str] = field(default_factory=dict)
    #: the model the policy calibrates (``attach``): a classifier, or a features_only wrapper
    root: nn.Module | None = field(default=None, repr=False)
    _pending: set[str] = field(default_factory=set)
    _checked: bool = False
    #: check mode: batches tried so far, and whether the user was told a stage could not be verified
    _check_attempts: int = 0
    _warned_unverified: bool = False
    #: check mode: the stages measured so far (a retry measures only the others), and those no batch could measure
    _check_measured: set[str] = field(default_factory=set)
    _unverified: set[str] = field(default_factory=set)
    _rearms: int = 0
    #: images of the batch whose backward re-armed the check: a smaller batch cannot measure the stage either
    _rearm_batch: int = 0
    _last_batch: int = 0
    _warned_model: bool = False
    #: the last ``_backprop_where_free`` measurement, by what it depended on
    _free_backprop: dict = field(default_factory=dict)
    #: the last ``_plain_graphs_where_free`` measurement, by what it depended on
    _free_plain_graphs: dict = field(default_factory=dict)
    #: measure where the leaner graphs lower the peak, and run the others with autograd's own (``lean_graphs``)
    plain_graphs_where_free: bool = True
    #: the last ``_candidates_by_peak`` measurement: (key, candidates in order, peaks)
    _candidate_order: tuple | None = None
    _handles: list = field(default_factory=list)
    _in_forward: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "check"):
            raise ValueError(f"policy mode must be 'auto' or 'check', got {self.mode!r}")
        check_policy_options("auto", self.min_cosine, self.recheck_every)
        if self.sample_images < 2:
            raise ValueError(f"sample_images must be >= 2 (BatchNorm needs two), got {self.sample_images}")
        unknown = [c for c in self.candidates if c not in METHODS]
        if unknown:
            raise ValueError(f"unknown candidate method(s) {unknown}; valid: {list(METHODS)}")
        self._handles = [stage.register_report_hook(self._on_report) for stage in self.stages.values()]
        if self.mode == "auto":
            self._pending = set(self.stages)

    # ------------------------------------------------------------------ when to measure
    def due(self) -> bool:
        """Whether the next training step should calibrate first."""
        if self.mode == "check":
            return not self._checked
        if self._pending:
            return True
        if self.step in EARLY_RECHECKS:
            return True
        return self.recheck_every > 0 and self.step > 0 and self.step % self.recheck_every == 0

    def attach(self, model: nn.Module, first_module: nn.Module | None = None) -> None:
        """Calibrate ``model`` from its own training forwards, so a plain PyTorch loop needs no extra call.

        A forward pre-hook on ``model`` calls ``before_step`` (unless the policy is ``external``); one on
        ``first_module`` (the module every forward path runs first on the images, e.g. the stem's first conv)
        does for the paths that bypass ``model.forward``: ``forward_intermediates`` or ``forward_features`` called
        directly. Each training forward counts once. The hooks do nothing under ``torch.no_grad()``, in eval mode,
        inside a backward, on tracing proxies, under torch.func transforms or inside a measurement; under
        ``torch.compile`` they run eagerly (a graph break), never while compiling.
        """
        self.root = model
        self._handles.append(model.register_forward_pre_hook(self._before_forward))
        self._handles.append(model.register_forward_hook(self._after_forward, always_call=True))
        if first_module is not None:
            self._handles.append(first_module.register_forward_pre_hook(self._before_forward))

    def detach(self) -> None:
        """Remove every hook this policy registered (on the model and on its stages)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.compiler.disable
    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if measuring():
            return  # a measurement's own forwards (this policy's calibration among them)
        if module is not self.root and self._in_forward:
            return  # the model's own forward already counted this step
        if module is self.root:
            self._in_forward = True
        model = self.root
        if self.external or model is None or not model.training or not torch.is_grad_enabled() or not args:
            return
        if torch._C._current_autograd_node() is not None:
            return  # a recomputation inside a backward, not a forward
        images = args[0]
        if not isinstance(images, torch.Tensor) or isinstance(images, torch.fx.Proxy) or torch.jit.is_tracing():
            return
        transforming = getattr(torch._C, "_are_functorch_transforms_active", None)
        if transforming is not None and transforming():
            return
        self.before_step(model, images)

    @torch.compiler.disable
    def _after_forward(self, _module: nn.Module, _args: tuple, _output: Any) -> None:
        if not measuring():
            self._in_forward = False

    def before_step(self, model: nn.Module, batch: Any) -> None:
        """Call before each training forward (the model's pre-hook does, see ``attach``, or the Lightning module)."""
        if measuring():
            return  # a measurement is not a training step: no calibration, no step count
        images, _ = split_batch(batch)
        if images.shape[0] == 0:
            return  # an empty batch trains nothing
        due = self.due()
        if due and self.mode == "check" and self._unverified and images.shape[0] < self._rearm_batch:
            self.step += 1  # a re-armed check waits for a batch as large as the one that ran the method
            return
        self._last_batch = images.shape[0]
        if due:
            if images.shape[0] < 2:
                # BatchNorm needs two images to measure: stay as is (exact before the first calibration)
                if self.mode == "check":
                    self._warn_unverified(sorted(self._approximate_stages()), "batches of 1 image (a measurement needs 2)")
                return
            # (under DDP every rank must join the leader's calibration: there the leader's own check raises)
            if self.mode != "check" and self.sync is None and not bool(torch.isfinite(images[: self.sample_images]).all()):
                log.warning("the batch has NaN/inf values: the stages keep their methods and calibrate on the next batch")
                self._pending.update(name for name in self.stages if name not in self.pinned)
                self.step += 1
                return
            self.calibrate(model, batch)
        self.step += 1

    def _on_report(self, stage: AdjointSequential, report: BackwardReport) -> None:
        if report.plan is not None and report.plan.measurement:
            return
        if report.fell_back:
            self._on_fallback(stage, report.fallback_reason or "exact fallback")
        if self.mode == "check" and self._checked and self._unverified and report.plan is not None and report.plan.method == stage.method:
            name = next((n for n, s in self.stages.items() if s is stage), None)
            if name in self._unverified and self._rearms < MAX_CHECK_ATTEMPTS:  # a batch large enough to run it came
                self._rearms += 1
                self._rearm_batch = self._last_batch
                log.info("stage %s ran %s for the first time: its gradient is checked on the next batch", name, stage.method)
                self._checked = False

    def pin(self, name: str, method: str, reason: str) -> None:
        """Fix stage ``name`` to ``method`` from now on (auto no longer measures it), recorded as a decision."""
        get_method(method)
        self.pinned[name] = method
        self._pending.discard(name)
        self._apply(name, method, lean_graphs=tuple(self.stages[name].lean_graphs))
        self.decisions.append(PolicyDecision(name, method, self.step, float("nan"), float("nan"), f"{method}: {reason}"))

    def _on_fallback(self, stage: AdjointSequential, reason: str) -> None:
        name = next((n for n, s in self.stages.items() if s is stage), stage.display_name)
        self.fallbacks += 1
        if self.sync is not None:
            # under DDP a rank-local event must not start a collective: the next scheduled recheck handles it
            log.warning("stage %s: %s; this step's gradient was recomputed exactly", name, reason)
            return
        log.warning("stage %s: %s; this step's gradient was recomputed exactly, recalibrating", name, reason)
        if self.mode == "auto" and name not in self.pinned:
            self._pending.add(name)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, model: nn.Module, batch: Any) -> list[PolicyDecision]:
        """Measure on (a few images of) ``batch`` and set or check each stage's method; returns new decisions."""
        images, targets = split_batch(batch)
        _check_images(model, images)
        if targets is not None and targets.shape[:1] != images.shape[:1]:
            raise ValueError(
                f"calibration: {images.shape[0]} images but targets of shape {tuple(targets.shape)}; give one target "
                "(a class index or a row of soft targets) per image"
            )
        classes = _class_count(model)
        if targets is not None and not targets.dtype.is_floating_point and targets.dim() == 1 and classes is not None and targets.numel():
            high = int(targets.max())  # negative labels are cross-entropy's ignore_index (-100), not checked here
            if high >= classes:
                raise ValueError(
                    f"calibration: target {high} is not a class index of this model (its classifier has {classes} "
                    f"outputs: 0 to {classes - 1})"
                )
        # a check re-armed because a stage first ran its method on a batch this size measures it on the whole batch:
        # a sample of it may be too small to run the method again
        sample = images.shape[0] if self.mode == "check" and self._unverified else self.sample_images
        images = images[:sample]
        targets = None if targets is None else targets[:sample]
        if images.shape[0] < 2:
            raise ValueError(f"calibration needs at least 2 images (BatchNorm), got {images.shape[0]}")
        if targets is not None and (targets.dim() != 1 or targets.dtype.is_floating_point):
            targets = None  # soft targets (mixup): calibrate with pseudo-labels
        with torch.enable_grad():  # a measurement needs gradients, whatever the caller's mode
            if self.mode == "check":
                if not bool(torch.isfinite(images).all()):
                    log.warning("the batch has NaN/inf values: the explicit scheme(s) are checked on the next batch")
                    return []
                new, unmeasured = self._check(model, images, targets)
                self._check_attempts += 1
                # a stage that ran exactly here is checked after the first batch that runs its method (_on_report),
                # not retried on batches of the same size, which cannot measure it either
                self._checked = True
                if unmeasured:
                    self._unverified = set(unmeasured)
                    self._warn_unverified(unmeasured, f"a batch of {images.shape[0]} images (too few values per BatchNorm channel)", exact_now=True)
            else:
                if self.leader and not bool(torch.isfinite(images).all()):
                    raise ValueError(
                        "the calibration images have NaN/inf values: a gradient measured on them says nothing about "
                        "the methods; calibrate on finite images"
                    )
                new = self._choose(model, images, targets)
                self._pending.clear()
        self.decisions.extend(new)
        return new

    def _choose(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None) -> list[PolicyDecision]:
        if not self.leader:
            settings = self.sync(None) if self.sync is not None else self._settings()
            for name, (method, lean_parts) in settings.items():
                self._apply(name, method, lean_graphs=lean_parts)
            return []
        params = unique_params(model)
        stages = self.stages
        running_lean = {name: stage.lean_graphs for name, stage in stages.items()}
        for stage in stages.values():
            stage.lean_graphs = True  # candidates' peaks are measured with the leaner graphs (a recheck may find them off)
        new: list[PolicyDecision] = []
        # every probe runs a method as it is (no fallback), starting from the exact method everywhere
        chosen = {name: self.pinned.get(name, "block") for name in stages}
        bounds: dict[str, float] = {}
        decided: dict[str, PolicyDecision] = {}
        with side_effect_free(model):
            candidates = self._candidates_by_peak(model, images)
        with side_effect_free(model), no_fallback(stages):
            with exact_reference(stages) as reference:
                exact = gradients(model, images, targets, params)
            subsets: list = []  # halves and pairs of the batch with their exact gradients, made when first needed
            for name in reversed(list(stages)):
                if name in self.pinned:
                    continue
                plan = reference.plan(stages[name])
                values = plan.values_per_channel if plan is not None else None
                decision = self._choose_stage(model, name, images, targets, params, exact, chosen, values, subsets, candidates)
                chosen[name] = decision.method
                decided[name] = decision
                error = decision.reconstruction_error
                if error is not None and math.isfinite(error) and get_method(decision.method).gradient == "adjoint":
                    bounds[name] = max(ERROR_GROWTH * error, ERROR_FLOOR)
        if self.backprop_where_free:
            with side_effect_free(model):
                for decision in self._backprop_where_free(model, images, chosen):
                    chosen[decision.stage] = decision.method
                    decided[decision.stage] = decision
                    bounds.pop(decision.stage, None)
        lean_parts = dict.fromkeys(stages, LEAN_PARTS)
        if self.plain_graphs_where_free:
            with side_effect_free(model):
                found = self._plain_graphs_where_free(model, images, chosen)
            if found is None:  # not measurable on this batch: the stages keep what they ran with
                found = {}
                for name in stages:  # but a reconstruction's steps decide its gradient (see _steps_decide_the_gradient)
                    keep = set(running_lean[name]) | ({"steps"} if _steps_decide_the_gradient(chosen[name]) else set())
                    lean_parts[name] = tuple(p for p in LEAN_PARTS if p in keep)
            for name, (parts, reason) in found.items():
                lean_parts[name] = parts
            for name in decided:
                if lean_parts[name] != LEAN_PARTS:
                    reason = found[name][1] if name in found else "autograd's own graph kept from the last measurement"
                    decided[name] = replace(decided[name], reason=f"{decided[name].reason}; {reason}", lean_graphs=lean_parts[name])
        for name in decided:  # output side first, as decided (returned input side first)
            decision = decided[name]
            changed = decision.method != stages[name].method or set(decision.lean_graphs) != running_lean[name]
            if changed or not any(d.stage == name for d in self.decisions):
                new.append(decision)
        settings = {name: (chosen[name], lean_parts[name]) for name in stages}
        if self.sync is not None:
            settings = self.sync(settings)
        for name, (method, parts) in settings.items():
            self._apply(name, method, bounds.get(name), lean_graphs=parts)
        for decision in new:
            log.info("stage %s: %s", decision.stage, decision.reason)
        return new[::-1]

    def _candidates_by_peak(self, model: nn.Module, images: torch.Tensor) -> tuple[str, ...]:
        """``candidates`` ordered by the step peak each gives when every stage runs it, measured on the calibration
        images (as training runs them, fallback included); equal peaks (within ``PEAK_TIE``) keep the given order.

        Which method needs least memory depends on the model: a reconstruction keeps least at rest but its
        backward's working set is larger than a 16-bit block's, and the deeper the network, the more the stored
        inputs weigh. Measured once per calibration shape and storage form (float16 and bfloat16 block inputs
        need the same bytes; exact block inputs, twice those, go last when a 16-bit block is a candidate); the
        given order where a peak cannot be measured.
        """
        candidates = tuple(self.candidates)
        if len(candidates) < 2 or images.shape[0] < 4:
            return candidates  # a per-image peak needs two batch sizes of at least two images (BatchNorm)
        if images.device.type != "cuda" and torch.autograd.profiler._is_profiler_enabled:
            log.info("a profiler is running: the CPU's step peak cannot be measured now, candidates keep their order")
            return candidates
        key = (candidates, tuple(images.shape), images.dtype, images.device)
        if self._candidate_order is not None and self._candidate_order[0] == key:
            return self._candidate_order[1]
        peaks: dict[str, float] = {}
        measured: dict[tuple, float] = {}
        sixteen_bit_block = any(_storage_of(m)[0] == "block" and _storage_of(m)[1] < 4 for m in candidates)
        for method in candidates:
            storage = _storage_of(method)
            if storage == ("block", 4) and sixteen_bit_block:
                peaks[method] = math.inf  # exact block inputs: twice a 16-bit block's storage, never less peak
                continue
            if storage not in measured:  # float16 and bfloat16 block inputs need the same bytes: measured once
                measured[storage] = _step_peak(model, self.stages, dict.fromkeys(self.stages, method), images)
            peaks[method] = measured[storage]
        ordered: list[str] = []
        for method in sorted(candidates, key=peaks.__getitem__):
            # a method within PEAK_TIE of one placed before it that comes earlier in the given order goes before it
            position = len(ordered)
            while position > 0 and peaks[method] <= peaks[ordered[position - 1]] * (1 + PEAK_TIE) and candidates.index(ordered[position - 1]) > candidates.index(method):
                position -= 1
            ordered.insert(position, method)
        log.info("candidates by measured step peak (MiB per image): %s", ", ".join(f"{m} {peaks[m]:.2f}" for m in ordered if math.isfinite(peaks[m])))
        self._candidate_order = (key, tuple(ordered), peaks)
        return tuple(ordered)

    def _kept_unmeasurable(self, name: str, images: torch.Tensor, values: int | None) -> PolicyDecision | None:
        """At a recheck whose images are too few to measure the approximation a stage runs (an epoch's last batch of
        2): that method, as measured before, instead of falling back to exact storage until the next recheck. The
        engine stores a 16-bit input exactly where BatchNorm sees too few values, a reconstruction was verified on pairs of
        images when chosen (and its error is watched every step), and larger batches keep what a larger one measured."""
        previous = next((d for d in reversed(self.decisions) if d.stage == name), None)
        if previous is None or previous.method != self.stages[name].method or get_method(previous.method).exact:
            return None
        why = _unmeasurable(get_method(previous.method), values, images)
        if why is None:
            return None
        marker = f"{previous.method}: kept, "
        measured = previous.reason.split(" | measured: ", 1)[-1] if previous.reason.startswith(marker) else previous.reason
        reason = f"{marker}{why} at this recheck | measured: {measured}"
        return replace(previous, step=self.step, reason=reason)

    def _choose_stage(self, model, name, images, targets, params, exact, chosen, values, subsets, candidates) -> PolicyDecision:  # noqa: ANN001
        """The first candidate (least peak first) whose gradient holds for stage ``name``, the stages above it using
        what they were given (``chosen``), those below the exact method."""
        stage = self.stages[name]
        kept = self._kept_unmeasurable(name, images, values)
        if kept is not None:
            return kept
        if values is not None and values < MIN_VALUES_PER_CHANNEL:
            # the engine runs every method exactly there (see MIN_VALUES_PER_CHANNEL): nothing to measure, and
            # a larger training batch would use an approximation this calibration never saw
            reason = (
                f"block: exact; the calibration images give {values} values per BatchNorm channel here "
                f"(< {MIN_VALUES_PER_CHANNEL}), too few to measure an approximation (the state is small)"
            )
            return PolicyDecision(name, "block", self.step, 1.0, 1.0, reason)
        stage_params = unique_params(stage)
        tried: list[str] = []
        for method in candidates:
            spec = get_method(method)
            margin = SAFETY_MARGIN if spec.gradient == "adjoint" else ROUNDING_MARGIN
            required = 1.0 - margin * (1.0 - self.min_cosine)
            if spec.exact:
                reason = f"{method}: exact" + (f"; cheaper methods fell short: {', '.join(tried)}" if tried else "")
                return PolicyDecision(name, method, self.step, 1.0, 1.0, reason)
            why = _unmeasurable(spec, values, images)
            if why is not None:
                tried.append(f"{method} {why}")
                continue
            probes = [(images, targets, exact)]
            if spec.gradient == "adjoint":
                if not subsets:
                    subsets += self._subsets(model, images, targets, params)
                probes += subsets
            methods = {self.stages[n]: m for n, m in chosen.items()}
            methods[stage] = method
            cosine = model_cosine = 1.0
            error = None
            try:
                for probe_images, probe_targets, probe_exact in probes:
                    with planned(self.stages, methods=methods), planned([stage], keep_input=True) as probe:
                        grads = gradients(model, probe_images, probe_targets, params)
                    if probe_images is images:
                        report = probe.report(stage)
                        error = report.reconstruction_error if report is not None else None
                    cosine = _worst(cosine, compare(grads, probe_exact, stage_params)[0])
                    model_cosine = _worst(model_cosine, compare(grads, probe_exact, params)[0])
                    if not _worst(cosine, model_cosine) >= required:
                        break
            except (ReconstructionError, AdjointError) as err:  # never an out-of-memory error: that must surface
                tried.append(f"{method} failed ({type(err).__name__})")
                continue
            if _worst(cosine, model_cosine) >= required:
                reason = (
                    f"{method}: gradient cosine {cosine:.5f} (stage), {model_cosine:.5f} (model) >= {required:.4g}"
                    + (f"; cheaper methods fell short: {', '.join(tried)}" if tried else "")
                )
                return PolicyDecision(name, method, self.step, cosine, model_cosine, reason, error)
            tried.append(f"{method} {_worst(cosine, model_cosine):.4f}")
        return PolicyDecision(name, "block", self.step, 1.0, 1.0, f"block: exact; no candidate reached its bound ({', '.join(tried)})")

    def _backprop_where_free(self, model: nn.Module, images: torch.Tensor, chosen: dict[str, str]) -> list[PolicyDecision]:
        """Stages, from the output side down, whose plain autograd graph fits under the training step's peak.

        A stage's graph is freed before the stages below it start their backward, so keeping it costs peak memory
        only where it pushes what is live at some moment above the step's peak, set elsewhere (usually by a
        recomputation at high resolution). Near the output the states are small: there plain backprop saves the
        recomputation (the time of one forward of the stage) for nothing. Measured, on the calibration batch,
        with each stage's method as training will run it (fallback included); stops at the first stage that
        would raise the peak by more than ``FREE_PEAK_TOLERANCE``.
        """
        if images.device.type != "cuda" and torch.autograd.profiler._is_profiler_enabled:
            log.info("a profiler is running: the CPU's step peak cannot be measured now, no stage is given backprop")
            return []
        if images.shape[0] < 4:
            return []  # a per-image peak needs two batch sizes of at least two images (BatchNorm)
        key = (tuple(sorted(chosen.items())), tuple(images.shape), images.dtype, images.device)
        if key in self._free_backprop:  # a recheck that kept every method: the same measurement, not rerun
            return [replace(d, step=self.step) for d in self._free_backprop[key]]
        methods = dict(chosen)
        base = _step_peak(model, self.stages, methods, images)
        found: list[PolicyDecision] = []
        for name in reversed(list(self.stages)):
            if name in self.pinned or methods[name] == "backprop":
                continue
            trial = {**methods, name: "backprop"}
            peak = _step_peak(model, self.stages, trial, images)
            if peak > base * (1 + FREE_PEAK_TOLERANCE):
                break
            reason = (
                f"backprop: exact, no recomputation: its autograd graph fits under the step's peak "
                f"(measured on the calibration images: {peak:.2f} MiB per image with it, {base:.2f} with {methods[name]})"
            )
            found.append(PolicyDecision(name, "backprop", self.step, 1.0, 1.0, reason))
            methods = trial
        self._free_backprop = {key: found}
        return found

    def _measured_candidate_peak(self, chosen: dict[str, str], images: torch.Tensor) -> float | None:
        """The step peak ``_candidates_by_peak`` measured on these images where every stage runs the one method now
        chosen for all (the same measurement: every leaner graph on, fallback on), else None."""
        methods = set(chosen.values())
        if self._candidate_order is None or len(methods) != 1:
            return None
        key, _, peaks = self._candidate_order
        (method,) = methods
        if key[1:] != (tuple(images.shape), images.dtype, images.device) or not math.isfinite(peaks.get(method, math.inf)):
            return None
        return peaks[method]

    def _plain_graphs_where_free(self, model: nn.Module, images: torch.Tensor, chosen: dict[str, str]) -> dict[str, tuple[tuple[str, ...], str]] | None:
        """Per stage, the parts (``LEAN_PARTS``) that keep the engine's leaner graphs, where the others may
        recompute with autograd's own (the same gradient, faster) without raising the step's measured peak by
        more than ``LEAN_PEAK_TOLERANCE``; with the reason. The leaner graphs lower a backward's working set,
        which sets the peak only at high resolution: each part is tried from the output side down, and where it
        matters in one stage it is kept in the stages below it too (they work at higher resolution). Parts from
        the cheapest memory saving per time spent: the steps', a head's k×k recomputation, then the whole head.
        Every part off at once is measured first: where stored inputs set the peak (deep networks), that is all."""
        if images.device.type != "cuda" and torch.autograd.profiler._is_profiler_enabled:
            log.info("a profiler is running: the CPU's step peak cannot be measured now, the stages keep their graphs")
            return None
        if images.shape[0] < 4:
            return None  # a per-image peak needs two batch sizes of at least two images (BatchNorm)
        key = (tuple(sorted(chosen.items())), tuple(images.shape), images.dtype, images.device)
        if key in self._free_plain_graphs:
            return dict(self._free_plain_graphs[key])
        stages = self.stages
        previous = {name: stage.lean_graphs for name, stage in stages.items()}
        names = [n for n in reversed(list(stages)) if get_method(chosen[n]).gradient not in ("backprop", "checkpoint")]
        if not names:
            return {}
        # where a reconstruction reuses the step above's block output (euler_fast, heun), lean steps also decide
        # whether the top step keeps it: a different gradient from the one measured, so they stay as measured
        allowed = {n: set(LEAN_PARTS) - ({"steps"} if _steps_decide_the_gradient(chosen[n]) else set()) for n in names}
        plain: dict[str, set[str]] = {name: set() for name in names}
        peaks: dict[str, float] = {}
        try:
            for stage in stages.values():
                stage.lean_graphs = True
            base = self._measured_candidate_peak(chosen, images)
            if base is None:
                base = _step_peak(model, stages, chosen, images)
            for name in names:  # first every part off at once: where stored inputs set the peak, one measurement
                stages[name].lean_graphs = set(LEAN_PARTS) - allowed[name]
            peak = _step_peak(model, stages, chosen, images)
            all_off_fits = peak <= base * (1 + LEAN_PEAK_TOLERANCE)
            if all_off_fits:
                plain = {name: set(allowed[name]) for name in names}
                peaks = dict.fromkeys(names, peak)
            for name in names:
                stages[name].lean_graphs = set(LEAN_PARTS) - plain[name]
            for part in () if all_off_fits else ("steps", "head_recompute", "head"):
                for name in names:
                    stage = stages[name]
                    if (part != "steps" and stage.exact_head == 0) or part not in allowed[name]:
                        continue
                    # without the head's lean forms its recomputation has none to skip either
                    trial = {part, "head_recompute"} if part == "head" else {part}
                    stage.lean_graphs = set(LEAN_PARTS) - plain[name] - trial
                    peak = _step_peak(model, stages, chosen, images)
                    if peak > base * (1 + LEAN_PEAK_TOLERANCE):
                        stage.lean_graphs = set(LEAN_PARTS) - plain[name]
                        break
                    plain[name] |= trial
                    peaks[name] = peak
        finally:
            for name, stage in stages.items():
                stage.lean_graphs = previous[name]
        found = {
            name: (
                tuple(p for p in LEAN_PARTS if p not in parts),
                f"autograd's own graph for {' and '.join(_PART_NAMES[p] for p in LEAN_PARTS if p in parts and not (p == 'head_recompute' and 'head' in parts))} "
                f"(faster; with it off here and in the stages listed before, the step's peak is {peaks[name]:.2f} MiB "
                f"per image against {base:.2f} with every leaner graph: within {LEAN_PEAK_TOLERANCE:.0%})",
            )
            for name, parts in plain.items() if parts
        }
        self._free_plain_graphs = {key: dict(found)}
        return found

    def _subsets(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None, params) -> list:  # noqa: ANN001
        """The two halves of the calibration batch and its first two pairs of images, with their exact gradients."""
        half = images.shape[0] // 2
        probes = []
        for part in (slice(0, half), slice(half, 2 * half), slice(0, 2), slice(2, 4)):
            part_targets = None if targets is None else targets[part]
            probes.append((images[part], part_targets, exact_gradients(model, self.stages, images[part], part_targets, params)))
        return probes

    def _apply(self, name: str, method: str, bound: float | None = None, lean_graphs: Sequence[str] = LEAN_PARTS) -> None:
        stage = self.stages[name]
        stage.configure(method=method)
        stage.lean_graphs = lean_graphs
        if bound is not None:
            stage.max_reconstruction_error = bound
        # a reconstruction is watched every step, a 16-bit block input checked for overflow: an exact
        # recomputation replaces a bad gradient, and the stage is measured again
        spec = get_method(method)
        stage.fallback = spec.gradient == "adjoint" or (spec.gradient == "block" and spec.block_dtype is not None)

    def _approximate_stages(self) -> list[str]:
        return [name for name, stage in self.stages.items() if not get_method(stage.method).exact]

    def _warn_unverified(self, names: list[str], why: str, exact_now: bool = False) -> None:
        """Once per run: an explicit approximate scheme whose gradient nothing measured is a promise we cannot keep.
        ``exact_now``: the stages ran exactly on those batches (too few values per channel for their method)."""
        if self._warned_unverified or not names:
            return
        self._warned_unverified = True
        methods = sorted({self.stages[name].method for name in names})
        others = _stored_input_methods_other_than(methods)
        outcome = (
            "on batches that small they run exactly (their inputs stored in full), and the first batch large enough "
            "to run the method is followed by a check on the next one" if exact_now else "they train unverified"
        )
        warnings.warn(
            f"stage(s) {names}: the gradient of the explicit scheme(s) {methods} could not be checked against exact "
            f"backprop on {why}; {outcome}. Use scheme='auto', a stored-input method ({others}), or "
            "larger batches",
            UserWarning,
            stacklevel=3,
        )

    def _check(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None) -> tuple[list[PolicyDecision], list[str]]:
        """Decisions for the explicit approximate stages, and the stages whose method did not really run (a stage
        whose BatchNorm sees too few values here runs exactly: it is checked again on the next batch)."""
        params = unique_params(model)
        # a retry measures only the stages no earlier batch could (no second warning for one already measured)
        stages = {n: s for n, s in self.stages.items() if not get_method(s.method).exact and n not in self._check_measured}
        new: list[PolicyDecision] = []
        if not stages:
            return new, []
        with side_effect_free(model), no_fallback(self.stages) as ran:
            exact = exact_gradients(model, self.stages, images, targets, params)
            try:
                grads = gradients(model, images, targets, params)
            except (ReconstructionError, AdjointError) as err:
                grads, failure = None, f"{type(err).__name__}: {err}"
        unmeasured = {n: ran.plan(s) for n, s in stages.items() if ran.plan(s) is not None and ran.plan(s).method != s.method}
        for name, plan in unmeasured.items():
            new.append(PolicyDecision(name, plan.configured_method, self.step, float("nan"), float("nan"), f"{plan.configured_method} (explicit): not measured on this batch: {plan.reason}"))
        stages = {n: s for n, s in stages.items() if n not in unmeasured}
        if grads is None:  # the error names the stage that failed: the others were not measured, not wrong
            failed = {n: s for n, s in stages.items() if f"stage {n}:" in failure} or stages
            for name in stages.keys() - failed.keys():
                new.append(PolicyDecision(name, stages[name].method, self.step, float("nan"), float("nan"), f"{stages[name].method} (explicit): not measured on this batch: stage(s) {sorted(failed)} failed"))
            stages = failed
        for name, stage in stages.items():
            if grads is None:
                cosine = model_cosine = float("nan")
                reason = f"{stage.method} (explicit): the check step failed: {failure}"
            else:
                cosine, _ = compare(grads, exact, unique_params(stage))
                model_cosine, _ = compare(grads, exact, params)
                reason = f"{stage.method} (explicit): gradient cosine {cosine:.5f} (stage), {model_cosine:.5f} (model)"
            decision = PolicyDecision(name, stage.method, self.step, cosine, model_cosine, reason)
            new.append(decision)
            if grads is None or not cosine >= self.min_cosine:
                measured = f"failed on this batch ({failure})" if grads is None else (
                    f"gives its parameters a gradient cosine of {cosine:.4f} against exact backprop on this batch, "
                    f"below {self.min_cosine}"
                )
                others = _stored_input_methods_other_than([stage.method])
                warnings.warn(
                    f"stage {name}: scheme {stage.method!r} {measured}: its gradients are wrong for these weights. "
                    f"Use scheme='auto' (measures and picks per stage) or a stored-input method ({others})",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                log.info("stage %s: %s", name, reason)
        measured = [d for d in new if d.stage in stages]
        self._check_measured.update(stages)
        self._unverified -= set(stages)
        if grads is not None and measured and not min(d.model_grad_cosine for d in measured) >= self.min_cosine and not self._warned_model:
            self._warned_model = True
            warnings.warn(
                f"the whole model's gradient cosine against exact backprop is {measured[0].model_grad_cosine:.4f} on "
                f"this batch with the explicit scheme(s) {sorted({d.method for d in measured})}, below {self.min_cosine}",
                UserWarning,
                stacklevel=2,
            )
        return new, sorted(unmeasured)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Methods and decisions, so a resumed run continues with the same networks' gradients."""
        return {
            "methods": {name: stage.method for name, stage in self.stages.items()},
            "lean_graphs": {name: sorted(stage.lean_graphs) for name, stage in self.stages.items()},
            "bounds": {name: stage.max_reconstruction_error for name, stage in self.stages.items()},
            "decisions": [d.as_dict() for d in self.decisions],
            "step": self.step,
            "pending": sorted(self._pending),
            "checked": self._checked,
            "unverified": sorted(self._unverified),
            "check_measured": sorted(self._check_measured),
            "rearms": self._rearms,
            "pinned": dict(self.pinned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lean_graphs = state.get("lean_graphs", {})
        for name, method in state.get("methods", {}).items():
            if name in self.stages:
                if self.mode == "auto":
                    self._apply(name, method, lean_graphs=tuple(lean_graphs.get(name, LEAN_PARTS)))
        for name, bound in state.get("bounds", {}).items():
            if name in self.stages:
                self.stages[name].max_reconstruction_error = float(bound)
        self.decisions = [PolicyDecision(**d) for d in state.get("decisions", [])]
        self.step = int(state.get("step", 0))
        self._pending = set(state.get("pending", [])) & set(self.stages)
        self._checked = bool(state.get("checked", False))
        self._unverified = set(state.get("unverified", [])) & set(self.stages)
        # a check re-armed before saving measures, after resuming, only the stages no batch could measure
        self._check_measured = set(state.get("check_measured", [])) & set(self.stages)
        self._rearms = int(state.get("rearms", 0))
        self.pinned = {n: m for n, m in state.get("pinned", {}).items() if n in self.stages}
        for name, method in self.pinned.items():
            self._apply(name, method, lean_graphs=tuple(lean_graphs.get(name, LEAN_PARTS)))

    def methods(self) -> dict[str, str]:
        return {name: stage.method for name, stage in self.stages.items()}

    def _settings(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """What every process must run alike: each stage's method and the parts that recompute with leaner graphs."""
        return {name: (stage.method, tuple(sorted(stage.lean_graphs))) for name, stage in self.stages.items()}


def methods_table(decisions: Sequence[PolicyDecision]) -> str:
    """A markdown table of decisions (what ``diagnose`` and the CLI print)."""
    lines = ["| step | stage | method | grad cosine (stage) | grad cosine (model) | reason |", "|---|---|---|---|---|---|"]
    for d in decisions:
        lines.append(f"| {d.step} | {d.stage} | {d.method} | {d.grad_cosine:.5f} | {d.model_grad_cosine:.5f} | {d.reason} |")
    return "\n".join(lines)
