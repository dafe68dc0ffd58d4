"""How one residual stage computes its gradient, as one autograd Function.

Forward: run the stage without building a graph and keep only what the stage's gradient method needs,
plus the few bytes that make recomputation replay the forward (BatchNorm statistics, generator states):

- ``adjoint``: the stage output x_S (and, if asked, anchors every K steps and the top step's increment).
  Backward, for s = S-1 … 0 (docs/method.md):

      x̂_s  = reverse(x̂_{s+1})                    reconstruct the step's input (scheme), optionally refined
      x_out = Phi_s(x̂_s)  with autograd           one step's working set, freed after its VJP
      ∂L/∂x_s, ∂L/∂θ_s += vjp(x_out, ∂L/∂x_{s+1})

- ``block``: each step's input, optionally compressed (float16 / bfloat16): the VJP of step s starts from
  the stored input instead of a reconstruction. Exact when uncompressed; otherwise only the rounding of
  the input, never an error that grows with depth.
- ``checkpoint``: the stage input; the whole stage is recomputed with autograd, then one VJP (exact).

Parameters are inputs of the Function, so each receives its gradient exactly once per backward (DDP
hooks fire once; tied parameters are summed here). Blocks in the exact head (the shape-changing first
blocks of a timm stage) are recomputed from the stored stage input, which also gives the exact
reconstruction error at the adjoint part's input for free.

The backward holds only what the next step needs: each state is dropped as soon as the step below has
been reconstructed from it, reconstructions reuse the buffer of the output they replace where nothing
else can see it, and the reconstruction error is measured in place before the head's VJP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.profiler import record_function

from .errors import AdjointError, DoubleBackwardError, ReconstructionError
from .replay import AutocastState, BatchNormReplay, RngSnapshot, batch_counters_preserved

if TYPE_CHECKING:
    from .stage import AdjointSequential


@dataclass
class BackwardReport:
    """What one stage's last backward measured, for callbacks and ``diagnose``."""

    scheme: str
    gradient: str
    steps: int
    block_forwards: int
    #: ‖x̂_0 - x_0‖ / ‖x_0‖ at the input of the reconstructed part; None when x_0 was not kept
    reconstruction_error: float | None = None
    anchor_count: int = 0
    #: the approximate gradient was replaced by an exact recomputation (see ``AdjointSequential.fallback``)
    fell_back: bool = False
    #: why it fell back (non-finite reconstruction, reconstruction error above the stage's bound)
    fallback_reason: str | None = None


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reconstruction arithmetic runs in at least float32, whatever autocast or a cast did to the blocks."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _relative_error_in_place(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """‖estimate - truth‖ / ‖truth‖, overwriting ``estimate`` (no temporary the size of a state)."""
    truth_norm = torch.linalg.vector_norm(truth.to(estimate.dtype) if truth.dtype != estimate.dtype else truth)
    estimate.sub_(truth)
    return float(torch.linalg.vector_norm(estimate) / truth_norm.clamp_min(1e-30))


@dataclass
class StageRun:
    """Per-call state shared by forward and backward of one stage application."""

    stage: "AdjointSequential"
    params: list[torch.nn.Parameter]
    replay: BatchNormReplay = field(default_factory=BatchNormReplay)
    rng: dict[Any, RngSnapshot] = field(default_factory=dict)
    autocast: AutocastState | None = None
    block_forwards: int = 0
    #: dtype of the states the blocks saw in the forward (recomputation feeds them the same dtype)
    state_dtype: torch.dtype = torch.float32
    #: ``"all"`` (head and residual blocks in one node), ``"head"`` (the exact head alone) or ``"residual"``
    #: (the residual blocks, after a separate head node: see ``AdjointSequential.forward``)
    part: str = "all"
    #: for ``part="residual"``: the head's run (its random draws) and the stage input it started from
    head_run: "StageRun | None" = None
    head_input: torch.Tensor | None = None

    # ------------------------------------------------------------------ evaluation with replay
    def call(self, block: torch.nn.Module, x: torch.Tensor, key: Any, mode: str) -> torch.Tensor:
        """Run ``block`` at x as the forward evaluation ``key`` (BatchNorm routed by ``mode``).

        In the forward (modes ``record``/``forward``) the generator state is kept when the block drew
        random numbers; in recomputation it is restored around the call. Recomputation feeds the block
        the dtype it saw in the forward (reconstructions run in float32 even for 16-bit blocks).
        """
        if mode in ("record", "forward"):
            before = RngSnapshot.capture(x.device) if self.stage.preserve_rng_state else None
            with self.replay.evaluation(mode, key):
                out = block(x)
            if before is not None and not before.same_as(RngSnapshot.capture(x.device)):
                self.rng[key] = before
            return out
        if x.dtype != self.state_dtype and x.is_floating_point():
            x = x.to(self.state_dtype)
        snapshot = self.rng.get(key)
        if snapshot is None and self.head_run is not None:
            snapshot = self.head_run.rng.get(key)
        with self.replay.evaluation(mode, key):
            if snapshot is None:
                return block(x)
            with snapshot.restored():
                return block(x)

    def evaluator(self, mode: str):
        """``evaluate(n, x, key)`` for the schemes: residual block n, counted as one block forward."""

        def evaluate(n: int, x: torch.Tensor, key: Any) -> torch.Tensor:
            self.block_forwards += 1
            return self.call(self.stage.residual_block(n), x, key, mode)

        return evaluate

    @property
    def has_head(self) -> bool:
        """Whether this node runs (and differentiates) the stage's exact head itself."""
        return self.part in ("all", "head") and self.stage.exact_head > 0

    def run_head(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if self.part == "residual" and mode == "forward":
            return x  # the head ran in its own node
        for i, block in enumerate(self.stage.head_blocks()):
            x = self.call(block, x, ("head", i), mode)
        return x

    # ------------------------------------------------------------------ what the backward needs
    def keep(self, tensors: dict[str, Any]) -> None:
        """Hold what the backward needs on the run itself, not in ``save_for_backward``.

        The backward then owns these references and drops each one as soon as it is used (the stage
        output after the top reconstruction, each stored block input after its step), which
        ``save_for_backward`` cannot do: autograd keeps saved tensors until the whole node is done. The
        tensors are detached, so the output held here makes no reference cycle through its grad_fn.
        They are shown to ``observe_kept_tensors`` observers so measurements still count them.
        """
        held: dict[str, Any] = {}
        for name, value in tensors.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
            elif isinstance(value, dict):
                value = {k: v.detach() for k, v in value.items()}
            elif isinstance(value, list):
                value = [v.detach() for v in value]
            held[name] = value
        self.held = held
        if _KEPT_OBSERVERS:
            kept = [t for v in held.values() for t in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v]) if t is not None]
            kept += [t for recs in self.replay.records.values() for pair in recs for t in pair]
            kept += [t for snap in self.rng.values() for t in snap.tensors()]
            for observer in _KEPT_OBSERVERS:
                for t in kept:
                    observer(t)

    def take(self) -> dict[str, Any]:
        """Hand the kept tensors to the backward (once: a second backward finds nothing to start from)."""
        held = getattr(self, "held", None)
        if held is None:
            raise AdjointError(
                f"stage {self.stage.display_name}: a second backward through the same forward (retain_graph=True) "
                "is not supported; the first backward released what the stage kept. Run the forward again, or "
                "use scheme='backprop' for this stage"
            )
        self.held = None
        return held

    def release(self) -> None:
        """Drop the replay records and generator states once the backward is done with them."""
        self.replay.records, self.rng, self.held = {}, {}, None
        self.head_run = self.head_input = None


_KEPT_OBSERVERS: list[Any] = []


class observe_kept_tensors:  # noqa: N801 (used like saved_tensors_hooks)
    """Within this context, ``observer(t)`` sees every tensor an adjoint stage keeps for its backward.

    Stages keep their tensors outside ``save_for_backward`` (so the backward can drop them early), so a
    ``saved_tensors_hooks`` pack hook alone would not see them; measurements register here as well.
    """

    def __init__(self, observer) -> None:  # noqa: ANN001
        self.observer = observer

    def __enter__(self) -> "observe_kept_tensors":
        _KEPT_OBSERVERS.append(self.observer)
        return self

    def __exit__(self, *exc: object) -> None:
        _KEPT_OBSERVERS.remove(self.observer)


class AdjointStageFunction(torch.autograd.Function):
    """Memory-free backward through one residual stage (see module docstring)."""

    @staticmethod
    def forward(ctx: Any, run: StageRun, x: torch.Tensor, *params: torch.nn.Parameter) -> torch.Tensor:
        stage = run.stage
        run.autocast = AutocastState.capture(x.device.type)
        gradient = stage.gradient
        exact = gradient == "checkpoint"
        block = gradient == "block"
        adjoint = gradient == "adjoint"
        ctx.input_dtype = x.dtype
        x_in = x
        h = run.run_head(x, "forward")
        run.state_dtype = h.dtype
        ctx.run = run
        if run.part == "head":
            run.keep({"x_in": x_in})
            return h
        has_head = run.has_head or run.head_input is not None
        keep_x0 = adjoint and not has_head and (stage.keep_input or stage.fallback)
        anchors: dict[str, torch.Tensor] = {}
        step_inputs: list[torch.Tensor] = []
        scheme, record = stage.scheme_impl, run.evaluator("forward" if exact else "record")
        steps = stage.num_steps
        top_increment = None
        for s in range(steps):
            if block:
                step_inputs.append(h if stage.block_dtype in (None, h.dtype) else h.to(stage.block_dtype))
            out, _ = scheme.step(s, h, record)
            stage.check_shape(s, h, out)
            if adjoint and s == steps - 1 and stage.top_step_dtype is not None:
                top_increment = (out - h).to(stage.top_step_dtype)
            h = out
            if adjoint and stage.anchor_every and (s + 1) % stage.anchor_every == 0 and s + 1 < steps:
                anchors[str(s + 1)] = h
        keep_stage_input = exact or run.has_head or keep_x0
        run.keep(
            {
                "x_in": x_in if keep_stage_input else None,
                "head_input": run.head_input,
                "x_out": h if adjoint else None,
                "anchors": anchors,
                "top_increment": top_increment,
                "step_inputs": step_inputs,
            }
        )
        ctx.keep_x0 = keep_x0
        return h

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: StageRun = ctx.run
        stage = run.stage
        if torch.is_grad_enabled():
            raise DoubleBackwardError(
                f"stage {stage.display_name}: double backward (create_graph=True) through an adjoint stage "
                "is not supported; use scheme='backprop' for this stage to differentiate twice"
            )
        held = run.take()
        needs_input_grad = ctx.needs_input_grad[1]
        run.block_forwards = 0
        report = BackwardReport(
            scheme=stage.scheme,
            gradient=stage.gradient,
            steps=stage.num_steps,
            block_forwards=0,
            anchor_count=len(held.get("anchors") or {}),
        )
        label = f"resode::{stage.display_name}::{stage.gradient}"
        try:
            with record_function(label), batch_counters_preserved(stage.batchnorm_modules()), run.autocast.replayed():
                if run.part == "head":
                    grad_x, head_grads, _ = _head_vjp(run, held.pop("x_in"), grad_out, needs_input_grad, None)
                    param_grads = _ordered(run, dict((id(p), g) for p, g in head_grads if g is not None))
                elif stage.gradient == "checkpoint":
                    grad_x, param_grads = _exact_backward(run, held.pop("x_in"), grad_out, needs_input_grad)
                elif stage.gradient == "block":
                    grad_x, param_grads = _block_backward(run, held, grad_out, needs_input_grad)
                else:
                    grad_x, param_grads = _adjoint_backward(run, held, grad_out, needs_input_grad, ctx.keep_x0, report)
        finally:
            run.release()
            del held
        if grad_x is not None:
            grad_x = grad_x.to(ctx.input_dtype)
        report.block_forwards = run.block_forwards
        if run.part != "head":
            stage.last_backward = report
        return (None, grad_x, *param_grads)


# ---------------------------------------------------------------------------------------------- shared steps
def _accumulate(param_grads: dict[int, torch.Tensor], params: list[torch.nn.Parameter], grads) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        key = id(p)
        if key not in param_grads:
            param_grads[key] = g
        else:
            param_grads[key] = param_grads[key] + g


def _ordered(run: StageRun, param_grads: dict[int, torch.Tensor]) -> list[torch.Tensor | None]:
    return [param_grads.get(id(p)) for p in run.params]


def _step_vjp(run: StageRun, s: int, x_s: torch.Tensor, grad: torch.Tensor, want_x: bool):
    """VJP of step s at x_s (BatchNorm with the forward's statistics): (grad wrt x_s or None, param grads, cache)."""
    stage = run.stage
    step_params = stage.params_of_step(s, run.params)
    with torch.enable_grad(), record_function(f"resode::step{s}"):
        x_leaf = x_s.detach()
        if x_leaf.dtype != run.state_dtype:
            x_leaf = x_leaf.to(run.state_dtype)
        x_leaf.requires_grad_(want_x)
        out, cache = stage.scheme_impl.step(s, x_leaf, run.evaluator("substitute"))
        inputs = ([x_leaf] if want_x else []) + step_params
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True) if inputs else ()
        del out
    cache = cache.detach() if isinstance(cache, torch.Tensor) else cache
    grad_x = None
    if want_x:
        grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x_leaf)
        grads = grads[1:]
    return grad_x, list(zip(step_params, grads)), cache


def _head_vjp(run: StageRun, x_in: torch.Tensor, grad: torch.Tensor, needs_input_grad: bool, handover: list[torch.Tensor] | None):
    """Recompute the exact head from the stored stage input and back-propagate through it.

    Returns (grad wrt the stage input, param grads, reconstruction error at the head's output or None).
    ``handover`` holds the only reference to the reconstructed head output x̂_0: the error is measured in
    place on it and it is dropped before the head's backward, so it does not add to that peak.
    """
    x0_hat = handover.pop() if handover else None
    stage = run.stage
    head_params = stage.params_of_head(run.params)
    with torch.enable_grad(), record_function("resode::head"):
        x = x_in.detach().requires_grad_(needs_input_grad)
        x0 = run.run_head(x, "exact")
        error = None if x0_hat is None else _relative_error_in_place(x0_hat, x0.detach())
        del x0_hat
        inputs = ([x] if needs_input_grad else []) + head_params
        grads = torch.autograd.grad(x0, inputs, grad, allow_unused=True) if inputs else ()
        del x0
    grad_x = None
    if needs_input_grad:
        grad_x, grads = grads[0], grads[1:]
    return grad_x, list(zip(head_params, grads)), error


def _exact_backward(run: StageRun, x_in: torch.Tensor, grad_out: torch.Tensor, needs_input_grad: bool, mode: str = "exact"):
    """Recompute the stage from ``x_in`` with autograd, then one VJP: exact.

    ``mode="exact"``: checkpointing (batch statistics of the recomputation, which are the forward's).
    ``mode="substitute"``: after a reconstructing forward, replaying the statistics it recorded (the fallback).
    ``x_in`` is this node's input: the stage input, or the head's exact output when the head is its own node.
    """
    stage = run.stage
    with torch.enable_grad():
        x = x_in.detach().requires_grad_(needs_input_grad)
        h = run.run_head(x, "exact") if run.part == "all" else x
        evaluate = run.evaluator(mode)
        for s in range(stage.num_steps):
            h, _ = stage.scheme_impl.step(s, h, evaluate)
        inputs = ([x] if needs_input_grad else []) + run.params
        grads = torch.autograd.grad(h, inputs, grad_out, allow_unused=True)
        del h
    grad_x = grads[0] if needs_input_grad else None
    return grad_x, list(grads[1:] if needs_input_grad else grads)


def _block_backward(run: StageRun, held: dict, grad_out: torch.Tensor, needs_input_grad: bool):
    """Per-step checkpoints: each step's VJP starts from its stored (possibly compressed) input, dropped after."""
    stage = run.stage
    step_inputs: list[torch.Tensor] = held.pop("step_inputs")
    param_grads: dict[int, torch.Tensor] = {}
    grad = grad_out
    need_grad_below = needs_input_grad or run.has_head
    finite_flags: list[torch.Tensor] = []
    for s in reversed(range(stage.num_steps)):
        want_x = s > 0 or need_grad_below
        x_s = step_inputs.pop()
        if stage.check_finite and x_s.dtype != run.state_dtype:
            finite_flags.append(torch.isfinite(torch.sum(x_s, dtype=torch.float32)))
        x_s = x_s.to(run.state_dtype)  # the only reference to the compressed copy goes here
        grad, step_grads, _ = _step_vjp(run, s, x_s, grad, want_x)
        del x_s
        _accumulate(param_grads, [p for p, _ in step_grads], [g for _, g in step_grads])
    if finite_flags and not bool(torch.stack(finite_flags).all()):
        raise ReconstructionError(
            f"stage {stage.display_name}: a block input stored in {stage.block_dtype} is not finite (it overflows "
            "that type); no gradient was returned, so the weights are untouched. Use scheme='block_bf16' (the "
            "range of float32) or scheme='block' for this stage"
        )
    grad_x = grad if needs_input_grad else None
    if run.has_head:
        grad_x, head_grads, _ = _head_vjp(run, held.pop("x_in"), grad, needs_input_grad, None)
        del grad
        _accumulate(param_grads, [p for p, _ in head_grads], [g for _, g in head_grads])
    return grad_x, _ordered(run, param_grads)


def _reconstruct(run: StageRun, s: int, x_next: torch.Tensor, cache: Any, held: dict, work_dtype: torch.dtype) -> torch.Tensor:
    """x̂_s from x̂_{s+1}: an anchor, the kept top increment, or the scheme's reverse step (refined)."""
    stage = run.stage
    anchor = (held["anchors"] or {}).pop(str(s), None)
    if anchor is not None:
        return anchor.to(work_dtype)
    top_increment = held.pop("top_increment", None) if s == stage.num_steps - 1 else None
    if top_increment is not None:
        return torch.sub(x_next, top_increment)  # type promotion: one buffer, in work_dtype
    frozen = run.evaluator("frozen")
    x_s = stage.scheme_impl.reverse(s, x_next, cache, frozen).to(work_dtype)
    for _ in range(stage.refine):
        x_s = x_s - (stage.scheme_impl.step(s, x_s, frozen)[0] - x_next)
    return x_s


def _adjoint_backward(run: StageRun, held: dict, grad_out: torch.Tensor, needs_input_grad: bool, keep_x0: bool, report: BackwardReport):
    stage = run.stage
    param_grads: dict[int, torch.Tensor] = {}
    x_out = held.pop("x_out")
    work_dtype = _work_dtype(x_out.dtype)
    x_next = x_out.to(work_dtype)
    # the output is still needed to explain a non-finite reconstruction; keep its finiteness, not the tensor
    output_finite = torch.isfinite(x_out.sum()) if stage.check_finite else None
    del x_out
    grad = grad_out
    cache = None
    finite_flags: list[torch.Tensor] = []
    steps = stage.num_steps
    need_grad_below = needs_input_grad or run.has_head
    for s in reversed(range(steps)):
        with torch.no_grad():
            x_s = _reconstruct(run, s, x_next, cache, held, work_dtype)
        del x_next, cache  # the step above's state and output are no longer needed
        want_x = s > 0 or need_grad_below
        grad, step_grads, cache = _step_vjp(run, s, x_s, grad, want_x)
        if stage.check_finite:
            # A sum is non-finite iff some entry is (or it overflows, which is as bad): one cheap pass each.
            # Parameter gradients are products of these two and finite weights, so checking them adds nothing.
            finite_flags.append(torch.isfinite(x_s.sum() + grad.sum() if want_x else x_s.sum()))
        _accumulate(param_grads, [p for p, _ in step_grads], [g for _, g in step_grads])
        x_next = x_s
        del x_s
    del cache
    bad_step = None
    if finite_flags:
        flags = torch.stack(finite_flags)
        if not bool(flags.all()):
            bad_step = steps - 1 - int((~flags).nonzero()[0])
    x_in = held.get("x_in")
    head_input = held.get("head_input")
    if head_input is not None:
        # the head is its own node: recompute its exact output (no graph) to measure and to fall back from
        with torch.no_grad():
            x_in = run.run_head(head_input, "exact")
        del head_input
    if bad_step is not None:
        if stage.fallback and x_in is not None:
            del x_next, grad
            return _fall_back(run, x_in, grad_out, needs_input_grad, report, f"non-finite reconstruction of block {stage.exact_head + bad_step}")
        raise ReconstructionError(_non_finite_message(stage, bad_step, grad_out, output_finite))
    grad_x = grad if needs_input_grad else None
    if x_in is not None:
        # hand the reconstruction over: the error is measured in place, so it does not outlive the measurement
        if run.has_head:
            handover = [x_next]
            del x_next
            grad_x, head_grads, report.reconstruction_error = _head_vjp(run, x_in, grad, needs_input_grad, handover)
        else:
            report.reconstruction_error = _relative_error_in_place(x_next, x_in)
            head_grads = []
            del x_next
        if stage.fallback and not report.reconstruction_error <= stage.max_reconstruction_error:
            del grad, grad_x, head_grads
            return _fall_back(
                run, x_in, grad_out, needs_input_grad, report,
                f"reconstruction error {report.reconstruction_error:.3g} > {stage.max_reconstruction_error:.3g}",
            )
        _accumulate(param_grads, [p for p, _ in head_grads], [g for _, g in head_grads])
    return grad_x, _ordered(run, param_grads)


def _fall_back(run: StageRun, x_in: torch.Tensor, grad_out: torch.Tensor, needs_input_grad: bool, report: BackwardReport, reason: str):
    """Replace this backward's approximate gradient by the exact one, recomputed from the stored stage input."""
    report.fell_back, report.fallback_reason = True, reason
    run.stage.note_fallback(reason)
    return _exact_backward(run, x_in, grad_out, needs_input_grad, mode="substitute")


def _non_finite_message(stage: "AdjointSequential", bad_step: int, grad_out: torch.Tensor, output_finite: torch.Tensor | None) -> str:
    """Say whether the stage's reconstruction failed, or the training had already diverged before it."""
    if not bool(torch.isfinite(grad_out).all()):
        return (
            f"stage {stage.display_name}: the gradient arriving from the layers above is not finite, so the loss "
            "or the layers above have diverged (lower the learning rate, check the data for NaN/inf, or use "
            "gradient clipping); this is not a reconstruction failure. No gradient was returned, so the weights "
            "are untouched"
        )
    if output_finite is not None and not bool(output_finite):
        return (
            f"stage {stage.display_name}: the stage's own forward output is not finite, so its input or weights "
            "already were (the training diverged, or the input has NaN/inf); this is not a reconstruction "
            "failure. No gradient was returned, so the weights are untouched"
        )
    return (
        f"stage {stage.display_name}: non-finite values in the reconstruction of block "
        f"{stage.exact_head + bad_step} or in its gradient (scheme {stage.scheme!r}); no gradient was returned, "
        "so the weights are untouched. This stage is not ODE-like enough for the adjoint: use scheme='auto' "
        "(measures and picks per stage), 'block_fp16' (stores each block's input in 16 bits) or 'block' (exact)"
    )
