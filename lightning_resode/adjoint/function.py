"""How one residual stage computes its gradient, as a chain of autograd nodes.

One training call of a stage of S residual steps (after an optional exact head of shape-changing blocks)::

    forward:   x ─StageEntry─▶ x_0 ─StageStep(0)─▶ x_1 ─ … ─StageStep(S-1)─▶ x_S ─StageExit─▶ out
                 runs the head,      each runs one step without a graph,    marks the output as its own,
                 resolves the plan   keeps what the step below needs         keeps what the top step needs

    backward:  StageExit ─▶ StageStep(S-1) ─▶ … ─▶ StageStep(0) ─▶ StageEntry
                 starts the relay     each rebuilds its step's input and      checks (finite, reconstruction
                                      takes the VJP of that one step          error), falls back or raises,
                                                                              head VJP, parameter gradients, report

- ``adjoint``: the top keeps x_S (and, if asked, the top step's increment and anchors); each step
  reconstructs x̂_s = reverse(x̂_{s+1}) (docs/method.md), optionally refined, then re-runs its blocks at x̂_s
  with autograd (BatchNorm with the forward's statistics) for ∂L/∂x_s and ∂L/∂θ_s.
- ``block``: each step's input, optionally stored in 16 bits; the step's VJP starts from it. Exact when
  uncompressed, otherwise only the rounding of the input, never an error growing with depth.
- ``checkpoint``: one node (``StageCheckpoint``) keeps the stage input and recomputes the whole stage.

Every kept tensor is saved with ``ctx.save_for_backward`` by the node *above* the one that uses it, so it is
freed as soon as that node returns, autograd's saved-tensor hooks see it, and ``retain_graph=True`` works.
Parameters are inputs of the entry node only, which returns their gradients once, after every step ran
(DDP hooks fire once, and an approximate gradient can still be replaced by the exact one). Between the
nodes of one stage the real gradient and state travel in the tape's :class:`~.tape.BackwardRelay`, while
autograd carries zero-size placeholders (see there why).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function

from .errors import AdjointError, DoubleBackwardError, ReconstructionError
from . import lean
from .lean import CompactInput
from .plan import StagePlan, resolve_plan
from .report import BackwardReport
from .schemes import Euler
from .tape import BackwardRelay, Tape


def run_chain(tape: Tape, x: torch.Tensor) -> torch.Tensor:
    """The stage's forward as a chain of nodes (see the module docstring); returns the stage output."""
    h = StageEntry.apply(tape, x, *tape.binding.trainable)
    plan = tape.plan
    starts = set(plan.run_starts or ())
    below = top_increment = kept = None
    for s in range(tape.num_steps):
        if starts:  # keep the input of each run's first step (exactly), handed to the node above the run
            passed = None
            if s in starts:
                passed, below = below, h.detach()
            _check_storable(tape, h)
            out = StageStep.apply(tape, s, h, passed)
        else:
            kept = _kept_input(tape, s, h)
            out = StageStep.apply(tape, s, h, below)
            below = kept
        # the top step's increment, unless its input is kept already (an anchor): x̂ = x_S − increment there
        if s == tape.num_steps - 1 and plan.gradient == "adjoint" and plan.top_step_dtype is not None and kept is None:
            with torch.no_grad():
                top_increment = (out - h).to(plan.top_step_dtype)
        h = out
    return StageExit.apply(tape, h, below, top_increment)


def run_checkpoint(tape: Tape, x: torch.Tensor) -> torch.Tensor:
    """The whole stage as one node that keeps its input and recomputes everything in backward (exact)."""
    return StageCheckpoint.apply(tape, x, *tape.binding.trainable)


def _kept_input(tape: Tape, s: int, h: torch.Tensor) -> torch.Tensor | None:
    """What step s needs in backward besides the relay: its stored input (``block``) or an anchor (``adjoint``)."""
    plan = tape.plan
    with torch.no_grad():
        if plan.gradient == "block":
            if plan.block_dtype is None or plan.block_dtype == h.dtype:
                return h.detach()
            stored = h.detach().to(plan.block_dtype)
            _note_fits(tape, stored)
            return stored
        if plan.anchor_every and 0 < s and s % plan.anchor_every == 0:
            return h.detach()
    return None


def _note_fits(tape: Tape, stored: torch.Tensor) -> None:
    """Overflow of the 16-bit type (or a non-finite input), known before the backward: one flag per stored input."""
    if tape.plan.check_finite:
        tape.stored_finite.append(torch.isfinite(torch.sum(stored, dtype=torch.float32)))


def _stored_inputs_fit(tape: Tape) -> bool:
    """Whether every 16-bit input fit its type: then a ``block`` call cannot fail, and needs no fallback."""
    return bool(torch.stack(tape.stored_finite).all()) if tape.stored_finite else True


def _check_storable(tape: Tape, h: torch.Tensor) -> None:
    """Re-runs: every input is stored as 16 bits in backward; whether it fits the type is known now."""
    plan = tape.plan
    if plan.check_finite and plan.block_dtype is not None and plan.block_dtype != h.dtype:
        with torch.no_grad():
            _note_fits(tape, h.detach().to(plan.block_dtype))


def _carried_run(tape: Tape, node: int) -> tuple[tuple[int, list[list[int]]] | None, list[torch.Tensor]]:
    """``store_every``: the run of steps the node at ``node`` (a step, or ``num_steps`` for the exit) hands down
    with its first input: (first step, counts per step) and the statistics of its steps but the top."""
    starts = tape.plan.run_starts
    if not starts or node == 0 or (node < tape.num_steps and node not in starts):
        return None, []
    first, top = tape.run_of(node - 1)
    counts, flat = tape.take_run_records(first, top)
    return (first, counts), flat


def _run_from(run: tuple[int, list[list[int]]] | None, flat: list[torch.Tensor]) -> tuple[int, list[tuple[list[int], tuple[torch.Tensor, ...]]]] | None:
    """A carried run as the relay holds it: (first step, [(counts, statistics) per step])."""
    if run is None:
        return None
    first, counts = run
    steps, pos = [], 0
    for step_counts in counts:
        n = 2 * sum(step_counts)
        steps.append((step_counts, tuple(flat[pos : pos + n])))
        pos += n
    return first, steps


# ---------------------------------------------------------------------------------------------- the nodes
class StageEntry(torch.autograd.Function):
    """The bottom of the chain: runs the exact head, resolves the call's plan, owns the parameters."""

    @staticmethod
    def forward(ctx: Any, tape: Tape, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        stage = tape.stage
        head_params = tape.binding.params_of(tape.head_blocks())
        tape.chain_input_needs_grad = bool(ctx.needs_input_grad[1]) or any(ctx.needs_input_grad[2 + i] for i in head_params)
        x0 = tape.run_head(x, "forward")
        tape.set_plan(*resolve_plan(stage, x0))
        tape.state_dtype = x0.dtype
        keep = stage.exact_head > 0 or tape.plan.keeps_chain_input
        ctx.save_for_backward(x if keep else None)
        ctx.tape, ctx.role = tape, "stage input"
        ctx.set_materialize_grads(False)
        return x0 if stage.exact_head > 0 else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, _placeholder: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        tape: Tape = ctx.tape
        _refuse_double_backward(tape)
        (x_in,) = _unpack(ctx)
        plan = tape.plan
        report = BackwardReport(
            scheme=plan.scheme, gradient=plan.gradient, steps=tape.num_steps, block_forwards=0,
            anchor_count=len(range(plan.anchor_every, tape.num_steps, plan.anchor_every)) if plan.gradient == "adjoint" and plan.anchor_every else 0,
            plan=plan,
        )
        try:
            with record_function(f"resode::{tape.stage.display_name}::{plan.gradient}"):
                grad_x, param_grads = _finish(tape, x_in, bool(ctx.needs_input_grad[1]), report)
        finally:
            report.block_forwards = tape.relay.block_forwards
            tape.relay = BackwardRelay()  # nothing of this backward stays referenced
        tape.stage._publish(report, tape.logs)
        if grad_x is not None:
            grad_x = grad_x.to(tape.input_dtype)
        return (None, grad_x, *(param_grads.get(i) for i in range(len(tape.binding.trainable))))


class StageStep(torch.autograd.Function):
    """One residual step x_{s+1} = Phi_s(x_s); it also keeps what the step below needs (``below``)."""

    @staticmethod
    def forward(ctx: Any, tape: Tape, s: int, h: torch.Tensor, below: torch.Tensor | None) -> torch.Tensor:
        out, _ = tape.scheme.step(s, h, tape.evaluator("record"))
        tape.stage.check_shape(s, h, out)
        counts, statistics = tape.take_records(s)
        tape.note_for_rerun(s, counts, statistics)
        ctx.run, run_statistics = _carried_run(tape, s)
        ctx.save_for_backward(below, *statistics, *run_statistics)
        ctx.tape, ctx.step, ctx.record_counts, ctx.own_statistics = tape, s, counts, len(statistics)
        ctx.role = _role_of(tape, below)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx: Any, _placeholder: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        tape: Tape = ctx.tape
        s = ctx.step
        _refuse_double_backward(tape)
        below, *statistics = _unpack(ctx)
        run = _run_from(ctx.run, statistics[ctx.own_statistics :])
        statistics = statistics[: ctx.own_statistics]
        with record_function(f"resode::{tape.stage.display_name}::{tape.plan.gradient}"), tape.records_restored(s, ctx.record_counts, statistics):
            del statistics
            if tape.plan.gradient == "block":
                grad_x = _block_step(tape, s, below, run)
            else:
                grad_x = _adjoint_step(tape, s, below)
        del below, run
        tape.relay.grad = grad_x
        return None, None, (None if grad_x is None else _placeholder_like(grad_x)), None


class StageExit(torch.autograd.Function):
    """The top of the chain: keeps what the top step needs, and starts each backward's relay.

    It returns its input as its own output (``mark_dirty``), so the stage output is an ordinary tensor (an
    in-place op on it is allowed, and caught here if the backward needed it) and no copy is made.
    """

    @staticmethod
    def forward(ctx: Any, tape: Tape, h: torch.Tensor, below: torch.Tensor | None, top_increment: torch.Tensor | None) -> torch.Tensor:
        ctx.mark_dirty(h)
        adjoint = tape.plan.gradient == "adjoint"
        ctx.run, run_statistics = _carried_run(tape, tape.num_steps)
        ctx.save_for_backward(h if adjoint else None, below, top_increment, *run_statistics)
        ctx.tape = tape
        ctx.role = "stage output" if adjoint else _role_of(tape, below)
        return h

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tape: Tape = ctx.tape
        _refuse_double_backward(tape)
        _refuse_changed_parameters(tape)
        x_out, below, top_increment, *run_statistics = _unpack(ctx)
        plan = tape.plan
        relay = tape.relay = BackwardRelay(grad=grad, stored=below, run_below=_run_from(ctx.run, run_statistics))
        del run_statistics
        if plan.fallback and not (plan.gradient == "block" and _stored_inputs_fit(tape)):
            relay.grad_out = grad  # the exact fallback restarts from the stage's incoming gradient
        if plan.check_finite and (plan.gradient == "adjoint" or tape.stored_finite):
            relay.grad_out_finite = torch.isfinite(_wide_sum(grad))
        if x_out is not None:
            relay.state = x_out.to(_work_dtype(x_out.dtype))
            relay.top_increment = top_increment
            relay.output_finite = torch.isfinite(_wide_sum(x_out)) if plan.check_finite else None
        return None, _placeholder_like(grad), None, None


class StageCheckpoint(torch.autograd.Function):
    """A whole stage as one node: keeps the stage input, recomputes the stage with autograd in backward (exact)."""

    @staticmethod
    def forward(ctx: Any, tape: Tape, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        tape.set_plan(*resolve_plan(tape.stage, None))
        h = tape.run_head(x, "forward")
        tape.state_dtype = h.dtype
        evaluate = tape.evaluator("forward")
        for s in range(tape.num_steps):
            out, _ = tape.scheme.step(s, h, evaluate)
            tape.stage.check_shape(s, h, out)
            h = out
        ctx.save_for_backward(x)
        ctx.tape, ctx.role = tape, "stage input"
        return h

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tape: Tape = ctx.tape
        _refuse_double_backward(tape)
        _refuse_changed_parameters(tape)
        (x,) = _unpack(ctx)
        plan = tape.plan
        tape.relay = BackwardRelay()
        with record_function(f"resode::{tape.stage.display_name}::checkpoint"):
            grad_x, param_grads = _exact_backward(tape, x, grad_out, bool(ctx.needs_input_grad[1]))
        # a stage that is all head reconstructs nothing: its reconstruction error is exactly zero
        report = BackwardReport(
            scheme=plan.scheme, gradient=plan.gradient, steps=tape.num_steps, block_forwards=tape.relay.block_forwards,
            reconstruction_error=0.0 if plan.gradient == "adjoint" else None, plan=plan,
        )
        tape.relay = BackwardRelay()
        tape.stage._publish(report, tape.logs)
        if grad_x is not None:
            grad_x = grad_x.to(tape.input_dtype)
        return (None, grad_x, *param_grads)


# ---------------------------------------------------------------------------------------------- one step
def _single_evaluation(scheme: Any) -> bool:
    """Whether a step of ``scheme`` is its block's output and nothing else: no arithmetic on x outside the block."""
    return type(scheme).step is Euler.step


def _block_step(tape: Tape, s: int, below: torch.Tensor | None, run: Any = None) -> torch.Tensor | None:
    """VJP of step s from its stored (possibly 16-bit) input; with ``store_every``, the top step of a run first
    re-runs the run from its kept input. ``below``/``run``: what this node keeps for the step (or run) below."""
    relay = tape.relay
    if tape.plan.run_lengths:
        if relay.run_below is not None:
            _rerun(tape, s)
        x_s = relay.run_inputs.pop(s)
        relay.stored, relay.run_below = below, run
    else:
        x_s, relay.stored = relay.stored, below
    # the stored (possibly 16-bit) input itself, handed over: the VJP upcasts it, and may keep it instead of the copy
    box = [x_s]
    del x_s
    grad_x, _ = _step_vjp(tape, s, box, _wants_input_grad(tape, s), want_cache=False)
    return grad_x


def _rerun(tape: Tape, top: int) -> None:
    """Recover the inputs of a run of steps ending at ``top`` from its kept first input: the steps forward without a
    graph, BatchNorm normalising with the forward's statistics, each input stored as the plan's block dtype (the
    kept one too: the steps' VJPs then read what storing every input would have given them, and the run holds one
    16-bit state per step). The forward itself goes on from the exact values, so no rounding compounds."""
    relay = tape.relay
    first, records = relay.run_below
    h, relay.stored, relay.run_below = relay.stored, None, None
    if len(records) != top - first:
        raise AdjointError(f"stage {tape.stage.display_name}: internal error, a run of steps {first}..{top} carried {len(records)} steps' statistics")
    dtype = tape.plan.block_dtype

    def stored(state: torch.Tensor) -> torch.Tensor:
        return state if dtype is None or dtype == state.dtype else state.to(dtype)

    inputs = {first: stored(h)}
    frozen = tape.evaluator("frozen")
    with torch.no_grad(), record_function(f"resode::rerun{first}-{top}"):
        for s, (counts, statistics) in zip(range(first, top), records):
            with tape.records_restored(s, counts, statistics), tape.recomputing(tape.step_blocks(s), {}):
                h, _ = tape.scheme.step(s, h, frozen)
            inputs[s + 1] = stored(h)
    del h
    relay.run_inputs = inputs


def _adjoint_step(tape: Tape, s: int, below: torch.Tensor | None) -> torch.Tensor | None:
    """Reconstruct x_s from x̂_{s+1} (dropped here), then the VJP of step s at it."""
    relay = tape.relay
    anchor, relay.stored = relay.stored, below
    x_s = _reconstruct(tape, s, anchor)
    del anchor
    want_x = _wants_input_grad(tape, s)
    # The cache (block output at x_s, for the step below) is a state held through this VJP. Where the incoming
    # gradient is the stage's own (the top step: not the engine's to overwrite, so the VJP holds one more state)
    # and the stage recomputes with lean graphs (its memory matters), the step below evaluates its block instead.
    want_cache = s > 0 and tape.scheme.uses_cache and (relay.grad_private or "steps" not in tape.replay.lean_parts)
    grad_x, cache = _step_vjp(tape, s, [x_s], want_x, want_cache=want_cache)
    if tape.plan.check_finite:
        # A sum is non-finite iff some entry is (or it overflows, which is as bad): one cheap pass each.
        # Parameter gradients are products of these two and finite weights, so checking them adds nothing.
        relay.finite_flags.append(torch.isfinite(_wide_sum(x_s) + _wide_sum(grad_x) if want_x else _wide_sum(x_s)))
    relay.state, relay.cache = x_s, cache
    return grad_x


def _wants_input_grad(tape: Tape, s: int) -> bool:
    return s > 0 or tape.chain_input_needs_grad


def _reconstruct(tape: Tape, s: int, anchor: torch.Tensor | None) -> torch.Tensor:
    """x̂_s from x̂_{s+1}: an anchor, the kept top increment, or the scheme's reverse step (refined)."""
    relay = tape.relay
    x_next, relay.state = relay.state, None
    cache, relay.cache = relay.cache, None
    if anchor is not None:
        if relay.top_increment is not None:
            raise AssertionError("a step with an anchor was also given the top step's increment")
        return anchor.to(_work_dtype(anchor.dtype))
    if relay.top_increment is not None:
        top_increment, relay.top_increment = relay.top_increment, None
        return torch.sub(x_next, top_increment)  # type promotion: one buffer, in the reconstruction's dtype
    frozen = tape.evaluator("frozen")
    scheme, work_dtype = tape.scheme, x_next.dtype
    with torch.no_grad(), tape.recomputing(tape.step_blocks(s), {}):
        x_s = scheme.reverse(s, x_next, cache, frozen).to(work_dtype)
        del cache
        for _ in range(tape.plan.refine):
            x_s = x_s - (scheme.step(s, x_s, frozen)[0] - x_next)
    return x_s


def _step_vjp(tape: Tape, s: int, box: list[torch.Tensor], want_x: bool, want_cache: bool) -> tuple[torch.Tensor | None, Any]:
    """VJP of step s at x_s (taken out of ``box``, so that the caller holds no reference to it) of the relay's
    gradient (BatchNorm with the forward's statistics); parameter gradients go to the relay. Returns (∂L/∂x_s or
    None, the scheme's cache for the step below or None)."""
    relay = tape.relay
    blocks = tape.step_blocks(s)
    indices = tape.binding.params_of(blocks)
    leaves = tape.binding.leaves(indices)
    holder = relay.take_grad()
    # a hook in a block may keep the gradient of the block's output (a tensor hook on it, a backward hook's
    # grad_output) or of its input (grad_input): then neither this gradient nor the one this VJP hands down is
    # the engine's alone
    hooks_free = not (lean.global_hooks() or any(lean.hooks_could_see(m) for b in blocks for m in tape.stage[b].modules()))
    holder.private = holder.private and hooks_free
    with torch.enable_grad(), record_function(f"resode::step{s}"), tape.recomputing(blocks, leaves):
        x_s = box.pop().detach()
        compact = None
        # on the CPU, where its 1×1 convolutions can read the 16-bit copy (``lean.pointwise_conv_arguments``); one
        # of the steps' lean forms: oneDNN on the upcast copy is faster (resnet50 at 8×128²: 1.40× vs 1.43× backprop)
        if x_s.dtype.itemsize < tape.state_dtype.itemsize and x_s.device.type == "cpu" and _single_evaluation(tape.scheme) and "steps" in tape.replay.lean_parts:
            compact = CompactInput(x_s, tape.state_dtype)  # the float32 values are made only if an op needs them
            x_leaf = compact.leaf
        else:
            x_leaf = x_s if x_s.dtype == tape.state_dtype else x_s.to(tape.state_dtype)
        del x_s
        x_leaf.requires_grad_(want_x)
        # the residual sum's gradient handed to the block's first convolution: one block, no hook that could hold it
        single_block = tape.stage[blocks[0]] if hooks_free and len(blocks) == 1 and _single_evaluation(tape.scheme) else None
        with (
            tape.replay.compact_input(compact),
            tape.replay.private_outputs([tape.stage[b] for b in blocks]),
            tape.replay.step_gradient(holder, x_leaf, single_block),
        ):
            out, cache = tape.scheme.step(s, x_leaf, tape.evaluator("substitute"))
        cache = (cache.detach() if isinstance(cache, torch.Tensor) else cache) if want_cache else None
        root = _GradientFromHolder.apply(holder, out)
        del out
        inputs = ([x_leaf] if want_x else []) + [leaves[i] for i in indices]
        grads = torch.autograd.grad(root, inputs, allow_unused=True) if inputs else ()
        del root, inputs
    # the step's graph is gone: a leaf still held elsewhere than here and in ``compact`` was kept by the block or a
    # hook during the recomputation (feature extraction), and gets its values before anyone reads it
    if compact is not None and compact.escaped(references=2):
        compact.materialize()
    del compact
    grad_x = None
    if want_x:
        grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x_leaf)
        grads = grads[1:]
        # the engine's own, unless the VJP handed back, unchanged, the very gradient it was given (the stage's)
        relay.grad_private = hooks_free and (holder.private or not holder.handed_back_unchanged(grad_x))
    relay.accumulate(indices, grads)
    return grad_x, cache


# ---------------------------------------------------------------------------------------------- the bottom
def _finish(tape: Tape, x_in: torch.Tensor | None, needs_input_grad: bool, report: BackwardReport) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """At the entry: check the chain's backward, fall back to the exact gradient or raise if it failed, then the
    head's VJP. Returns (∂L/∂ stage input or None, parameter gradients by index)."""
    plan, relay, stage = tape.plan, tape.relay, tape.stage
    grad = relay.grad
    relay.grad = None
    x_hat, relay.state = relay.state, None
    problem = _non_finite_problem(tape, x_in)
    head = stage.exact_head > 0
    sample = _error_sample(x_hat) if head and x_hat is not None else x_hat
    if sample is not x_hat:
        x_hat = sample.clone()  # the whole x̂ is not held beside the head's recomputation, graph or not
    del sample
    if problem is None and head and plan.gradient == "adjoint" and plan.fallback and x_in is not None:
        # whether the fallback is needed is known before the head's graph is built (one head forward without a
        # graph): the incoming gradient it would restart from, and x̂, are freed first, not held beside that graph
        with torch.no_grad(), tape.recomputing(tape.head_blocks(), {}):
            x0 = tape.run_head(x_in, "exact")
        problem = _reconstruction_problem(plan, report, x_hat, x0)
        del x0
        x_hat = None
    x_leaf = x0 = None
    shortcuts: list[tuple[torch.Tensor, tuple[int, int]]] = []
    if head:
        indices = tape.binding.params_of(tape.head_blocks())
        leaves = tape.binding.leaves(indices)
        x_leaf = x_in.detach().requires_grad_(needs_input_grad)
        with torch.enable_grad(), record_function("resode::head"), tape.recomputing(tape.head_blocks(), leaves):
            head_blocks = [stage[i] for i in tape.head_blocks()]
            with _subsampled_shortcuts(head_blocks, x_leaf, shortcuts), tape.replay.lean_head(), tape.replay.private_outputs(head_blocks):
                x0 = tape.run_head(x_leaf, "exact")
    else:
        x0 = x_in
    if problem is None and plan.gradient == "adjoint" and x0 is not None and x_hat is not None:
        problem = _reconstruction_problem(plan, report, x_hat, x0.detach())
    del x_hat
    if problem is None:
        relay.grad_out = None  # the fallback is not needed: the head's VJP below runs without it
    if problem is not None:
        if not plan.fallback or x_in is None:
            raise ReconstructionError(_failure_message(tape, problem))
        report.fell_back, report.fallback_reason = True, problem
        del grad, x0
        relay.param_grads = {}
        grad_out, relay.grad_out = relay.grad_out, None
        grad_x, grads = _exact_backward(tape, x_in, grad_out, needs_input_grad)
        return grad_x, {i: g for i, g in enumerate(grads) if g is not None}
    if not head:
        return (grad if needs_input_grad else None), relay.param_grads
    indices = tape.binding.params_of(tape.head_blocks())
    with torch.enable_grad(), record_function("resode::head"):
        root = _GradientFromHolder.apply(lean.StepGradient(grad, private=False), x0)
        del grad, x0
        wanted = [x_leaf, *(xs for xs, _ in shortcuts)] if needs_input_grad else []
        grads = torch.autograd.grad(root, wanted + [leaves[i] for i in indices], allow_unused=True) if wanted or indices else ()
        del root
    grad_x = None
    if needs_input_grad:
        grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x_leaf)
        for (_, (sh, sw)), grad_xs in zip(shortcuts, grads[1 : len(wanted)]):
            if grad_xs is not None:
                grad_x[..., ::sh, ::sw] += grad_xs
        grads = grads[len(wanted) :]
    del shortcuts
    relay.accumulate(indices, grads)
    return grad_x, relay.param_grads


@contextlib.contextmanager
def _subsampled_shortcuts(blocks: list[nn.Module], x_leaf: torch.Tensor, taken: list[tuple[torch.Tensor, tuple[int, int]]]) -> Iterator[None]:
    """In the head's recomputation, a strided 1×1 convolution of the block input (a downsampling shortcut) reads its
    subsampled input as a leaf of its own, and its input gradient stays subsampled until added in place.

    The arithmetic is the same (a 1×1 convolution with stride s only reads every s-th row and column), but the
    VJP no longer holds a full-size input gradient for the shortcut beside the main path's, nor (on the CPU) the
    full-size copy of the input its strided backward makes: resnet50's layer2 head VJP needs 13.9 instead of
    19.1 MiB per image. ``taken`` receives (subsampled leaf, stride) for each such call.
    """
    patched = []
    for block in blocks:
        for module in block.modules():
            if _strided_pointwise(module) and "forward" not in module.__dict__:
                module.forward = functools.partial(_pointwise_on_subsampled, module, module.forward, x_leaf, taken)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _strided_pointwise(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.padding == (0, 0)
        and module.dilation == (1, 1)
        and module.stride != (1, 1)
    )


def _pointwise_on_subsampled(conv: nn.Conv2d, plain_forward: Any, x_leaf: torch.Tensor, taken: list, inp: torch.Tensor) -> torch.Tensor:
    if inp is not x_leaf:
        return plain_forward(inp)
    sh, sw = conv.stride
    xs = x_leaf.detach()[..., ::sh, ::sw].requires_grad_(x_leaf.requires_grad)
    taken.append((xs, (sh, sw)))
    return F.conv2d(xs, conv.weight, conv.bias, 1, 0, 1, conv.groups)


ERROR_SAMPLE_STRIDE = 4


def _error_sample(state: torch.Tensor) -> torch.Tensor:
    """Every ``ERROR_SAMPLE_STRIDE``-th row and column of an image-shaped state (all images and channels), on which
    the reconstruction error is measured where x̂ would otherwise be held at full size beside the exact head's
    recomputation: its peak then holds 1/16 of x̂ (resnet50's ODE-like peak is set there). States smaller than 8×8
    positions are returned whole: they cost little, and a sample of them would be a few corners."""
    if state.dim() != 4 or min(state.shape[-2:]) < 2 * ERROR_SAMPLE_STRIDE:
        return state
    return state[..., ::ERROR_SAMPLE_STRIDE, ::ERROR_SAMPLE_STRIDE]


def _reconstruction_problem(plan: StagePlan, report: BackwardReport, x_hat: torch.Tensor, x0: torch.Tensor) -> str | None:
    """Report the reconstruction error (overwriting ``x_hat``, which may be ``_error_sample`` of the state: ``x0``,
    always whole, is then sampled alike, and a non-finite value outside the sample still makes the error NaN); the
    problem if it is above a fallback's bound."""
    sampled = x_hat.shape != x0.shape
    report.reconstruction_error = _relative_error_in_place(
        x_hat, _error_sample(x0) if sampled else x0, x0 if sampled else None
    )
    if plan.fallback and not report.reconstruction_error <= plan.max_reconstruction_error:
        if not math.isfinite(report.reconstruction_error):
            return f"reconstruction error is not finite ({report.reconstruction_error}): the state it is measured at has NaN/inf values"
        return f"reconstruction error {report.reconstruction_error:.3g} > {plan.max_reconstruction_error:.3g}"
    return None


def _non_finite_problem(tape: Tape, x_in: torch.Tensor | None) -> str | None:
    """Why the chain's backward cannot be used (a 16-bit input overflowed, a reconstruction went non-finite), or
    None; raises at once where the training had already diverged (that is not the method's failure)."""
    relay = tape.relay
    stored_ok = _stored_inputs_fit(tape)
    steps_ok = torch.stack(relay.finite_flags) if relay.finite_flags else None
    if stored_ok and (steps_ok is None or bool(steps_ok.all())):
        return None
    stage = tape.stage
    if relay.grad_out_finite is not None and not bool(relay.grad_out_finite):
        # the gradient arriving from above is already non-finite (a float16 GradScaler overflow, or a diverged loss):
        # hand on the non-finite gradient this gives, as plain autograd does, so GradScaler skips the step
        return None
    if (relay.output_finite is not None and not bool(relay.output_finite)) or (x_in is not None and not bool(torch.isfinite(x_in).all())):
        raise ReconstructionError(
            f"stage {stage.display_name}: the stage's input or its own forward output is not finite, so the training "
            "had already diverged (or the data has NaN/inf); this is not a reconstruction failure. No gradient was "
            "returned, so the weights are untouched. Lower the learning rate, check the data, or use gradient clipping"
        )
    if not stored_ok:
        return f"a block input does not fit {tape.plan.block_dtype} (overflow)"
    bad_step = tape.num_steps - 1 - int((~steps_ok).nonzero()[0])
    return f"non-finite reconstruction of block {stage.exact_head + bad_step}"


def _failure_message(tape: Tape, problem: str) -> str:
    stage, plan = tape.stage, tape.plan
    if problem.startswith("a block input"):
        return (
            f"stage {stage.display_name}: {problem}: a value of its input exceeds the type's range; no gradient was "
            "returned, so the weights are untouched. Use scheme='auto' (falls back to the exact gradient and "
            "measures again), 'block_bf16' (the range of float32) or 'block' for this stage"
        )
    if problem.startswith("non-finite"):
        block = problem.rsplit(" ", 1)[-1]
        return (
            f"stage {stage.display_name}: non-finite values in the reconstruction of block {block} or in its gradient "
            f"(scheme {plan.scheme!r}); no gradient was returned, so the weights are untouched. This stage is not "
            "ODE-like enough for the adjoint: use scheme='auto' (measures and picks per stage), 'block_fp16' (stores "
            "each block's input in 16 bits) or 'block' (exact)"
        )
    return f"stage {stage.display_name}: {problem}"


def _exact_backward(tape: Tape, x_in: torch.Tensor, grad_out: torch.Tensor, needs_input_grad: bool) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Recompute the whole stage from its exact input with autograd, then one VJP: exact.

    ``x_in`` is the stage input (the chain's input where there is no head). BatchNorm uses the batch statistics
    of the recomputation, which are the forward's (the input is exact); running statistics are not touched.
    """
    blocks = list(range(len(tape.stage)))
    leaves = tape.binding.leaves(list(range(len(tape.binding.trainable))))
    with torch.enable_grad(), tape.recomputing(blocks, leaves):
        x = x_in.detach().requires_grad_(needs_input_grad)
        h = tape.run_head(x, "exact")
        evaluate = tape.evaluator("exact")
        for s in range(tape.num_steps):
            h, _ = tape.scheme.step(s, h, evaluate)
        inputs = ([x] if needs_input_grad else []) + [leaves[i] for i in range(len(leaves))]
        grads = torch.autograd.grad(h, inputs, grad_out, allow_unused=True)
        del h
    grad_x = grads[0] if needs_input_grad else None
    return grad_x, list(grads[1:] if needs_input_grad else grads)


# ---------------------------------------------------------------------------------------------- helpers
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reconstruction arithmetic runs in at least float32, whatever autocast or a cast did to the blocks."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _wide_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of a state, finite iff every entry is: a float16 state is summed in float32 (a healthy one's float16
    sum passes 65504 and reads as an overflow)."""
    return x.sum(dtype=torch.float32) if x.dtype == torch.float16 else x.sum()


def _relative_error_in_place(estimate: torch.Tensor, truth: torch.Tensor, whole: torch.Tensor | None = None) -> float:
    """‖estimate - truth‖ / ‖truth‖, overwriting ``estimate`` (no temporary the size of a state); NaN where
    ``whole`` (the state ``truth`` is a sample of) has a non-finite value."""
    truth_norm = torch.linalg.vector_norm(truth.to(estimate.dtype) if truth.dtype != estimate.dtype else truth)
    estimate.sub_(truth)
    error = torch.linalg.vector_norm(estimate) / truth_norm.clamp_min(1e-30)
    if whole is not None:
        error = error + _wide_sum(whole) * 0  # inf·0 and NaN·0 are NaN: one read of the state, no second sync
    return float(error)


def _role_of(tape: Tape, kept: torch.Tensor | None) -> str:
    """What a kept tensor is to the user (for the in-place message): their stage input, or an internal copy."""
    if kept is not None and kept.untyped_storage().data_ptr() == tape.stage_input_storage:
        return "stage input"
    return "kept block input"


def _unpack(ctx: Any) -> tuple[torch.Tensor | None, ...]:
    """The node's saved tensors; a tensor the user modified in place since the forward is named, not used."""
    try:
        return ctx.saved_tensors
    except RuntimeError as err:
        if "modified by an inplace operation" not in str(err):
            raise
        stage = ctx.tape.stage
        raise AdjointError(
            f"stage {stage.display_name}: the {ctx.role} was modified in place after the forward (e.g. an in-place "
            "activation such as ReLU(inplace=True) applied to the stage's output or input), so the backward cannot "
            "start from it. Make that operation out of place, or use scheme='backprop' for this stage"
        ) from err


def _refuse_changed_parameters(tape: Tape) -> None:
    """At the start of a stage's backward: the parameters must be the ones the forward ran with."""
    changed = tape.binding.changed_in_place()
    if changed:
        names = _parameter_names(tape, changed)
        raise AdjointError(
            f"stage {tape.stage.display_name}: {len(changed)} parameter tensor(s) were modified in place after the "
            f"forward ({names}; e.g. an optimizer step before the backward, or before a second backward through a "
            "retained graph), so recomputing the stage would differentiate another function. Run the forward again "
            "after changing the weights"
        )


def _refuse_double_backward(tape: Tape) -> None:
    if torch.is_grad_enabled():
        raise DoubleBackwardError(
            f"stage {tape.stage.display_name}: double backward (create_graph=True) through an adjoint stage "
            "is not supported; use scheme='backprop' for this stage to differentiate twice"
        )


def _parameter_names(tape: Tape, indices: list[int], most: int = 3) -> str:
    names = {id(p): name for name, p in tape.stage.named_parameters(remove_duplicate=False)}
    shown = [names.get(id(tape.binding.trainable[i]), f"#{i}") for i in indices[:most]]
    return ", ".join(shown) + (f" and {len(indices) - most} more" if len(indices) > most else "")


class _GradientFromHolder(torch.autograd.Function):
    """A scalar root for a VJP whose backward takes the real output gradient out of a ``StepGradient``.

    ``torch.autograd.grad(out, inputs, grad)`` keeps ``out`` and ``grad`` alive until it returns (the call
    holds them), although autograd needs ``grad`` only for the first op of the VJP and ``out`` only as what
    that op saved. Starting from this root instead, the holder has the only reference to the gradient and
    the caller drops ``out``: both are freed as soon as the VJP's first op has used them.
    """

    @staticmethod
    def forward(ctx: Any, holder: lean.StepGradient, out: torch.Tensor) -> torch.Tensor:
        ctx.holder = holder
        return out.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _unit: torch.Tensor) -> tuple[None, torch.Tensor | None]:
        return None, ctx.holder.hand_over()


def _placeholder_like(t: torch.Tensor) -> torch.Tensor:
    """A zero gradient of t's shape that allocates nothing (autograd only checks shape, dtype and device).

    Nodes of one stage hand their real gradients to each other in the relay and give autograd this instead,
    so autograd holds no state-sized gradient while the next node runs.
    """
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
