"""How one residual stage computes its gradient, as a chain of autograd nodes.

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

Nodes: the exact head (the shape-changing first blocks of a timm stage, recomputed from the stored stage
input) is one node; each residual step is one node (``StageStepFunction``); below them an entry node
(``StageEntryFunction``) owns the parameters and returns all their gradients once, after every step ran
(DDP hooks fire once; an approximate gradient can still be replaced by the exact one). A whole-stage
checkpoint is one node.

The backward holds only what the next step needs. Autograd keeps the gradient it hands to a node alive
until the node returns, so nodes of one stage pass their real gradients to each other on the run and give
autograd a zero-size placeholder; each VJP starts from a root that owns the incoming gradient, so it is
freed as soon as the VJP's first op used it. States are dropped as soon as the step below was rebuilt from
them, reconstructions reuse the buffer of the output they replace where nothing else can see it, and the
reconstruction error is measured in place.
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
    #: chains (``StageEntryFunction``): whether the chain's input needs a gradient, what the forward collects
    #: for ``keep``, and the state the backward's steps hand down (reconstruction, gradients, checks)
    needs_input_grad: bool = True
    pending: dict[str, Any] | None = None
    chain: dict[str, Any] | None = None
    report: BackwardReport | None = None
    #: for ``part="head"``: the real gradient at the head's output, handed over by the residual chain
    incoming: torch.Tensor | None = None
    #: chains: the gradient mode and block dtype this call uses (the stage's, or exact stored inputs where
    #: BatchNorm sees too few values per channel for an approximation, see ``MIN_VALUES_PER_CHANNEL``)
    gradient: str = ""
    block_dtype: torch.dtype | None = None
    #: the version counters of what ``keep`` holds, checked by ``take`` (in-place changes after the forward)
    versions: list = field(default_factory=list)

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
        # autograd's saved tensors check that nobody modified them in place; these are not saved tensors,
        # so the same check is made here (a detached tensor shares its original's version counter)
        self.versions = [(name, [t._version for t in _tensors_of(v)]) for name, v in held.items()]
        if _KEPT_OBSERVERS:
            kept = [t for v in held.values() for t in _tensors_of(v)]
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
        for name, versions in self.versions:
            if [t._version for t in _tensors_of(held.get(name))] != versions:
                what = "stage output" if name == "x_out" else "stage input" if name in ("x_in", "head_input") else f"kept {name}"
                raise AdjointError(
                    f"stage {self.stage.display_name}: the {what} was modified in place after the forward (e.g. an "
                    "in-place activation such as ReLU(inplace=True) applied to the stage's output or input), so the "
                    "backward cannot start from it. Make that operation out of place, or use scheme='backprop' for "
                    "this stage"
                )
        self.versions = []
        return held

    def release(self) -> None:
        """Drop the replay records and generator states once the backward is done with them."""
        self.replay.records, self.rng, self.held = {}, {}, None
        self.head_run = self.head_input = self.pending = self.chain = self.report = self.incoming = None
        self.versions = []


_KEPT_OBSERVERS: list[Any] = []


def _tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, list):
        return list(value)
    return []


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
    """One autograd node for a whole stage part: the exact head alone, or a whole-stage checkpoint."""

    @staticmethod
    def forward(ctx: Any, run: StageRun, x: torch.Tensor, *params: torch.nn.Parameter) -> torch.Tensor:
        stage = run.stage
        run.autocast = AutocastState.capture(x.device.type)
        ctx.input_dtype = x.dtype
        ctx.run = run
        h = run.run_head(x, "forward")
        run.state_dtype = h.dtype
        if run.part == "head":
            run.keep({"x_in": x})
            return h
        evaluate = run.evaluator("forward")
        for s in range(stage.num_steps):
            out, _ = stage.scheme_impl.step(s, h, evaluate)
            stage.check_shape(s, h, out)
            h = out
        run.keep({"x_in": x})
        return h

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: StageRun = ctx.run
        stage = run.stage
        _refuse_double_backward(stage)
        held = run.take()
        needs_input_grad = ctx.needs_input_grad[1]
        run.block_forwards = 0
        label = f"resode::{stage.display_name}::{'head' if run.part == 'head' else stage.gradient}"
        try:
            with record_function(label), batch_counters_preserved(stage.batchnorm_modules()), run.autocast.replayed():
                if run.part == "head":
                    # the residual chain above hands its real gradient over on the run (grad_out is a placeholder)
                    holder = [run.incoming if run.incoming is not None else grad_out]
                    run.incoming = None
                    del grad_out
                    grad_x, head_grads = _head_vjp(run, held.pop("x_in"), holder, needs_input_grad)
                    param_grads = _ordered(run, dict((id(p), g) for p, g in head_grads if g is not None))
                else:
                    grad_x, param_grads = _exact_backward(run, held.pop("x_in"), grad_out, needs_input_grad)
        finally:
            run.release()
            del held
        if grad_x is not None:
            grad_x = grad_x.to(ctx.input_dtype)
        if run.part != "head" or stage.num_steps == 0:
            # a stage that is all head reconstructs nothing: its reconstruction error is exactly zero
            stage.last_backward = BackwardReport(
                scheme=stage.scheme, gradient=stage.gradient, steps=stage.num_steps, block_forwards=run.block_forwards,
                reconstruction_error=0.0 if run.part == "head" and stage.gradient == "adjoint" else None,
            )
        return (None, grad_x, *param_grads)


class StageEntryFunction(torch.autograd.Function):
    """The bottom of a stage's chain of step nodes: it owns the parameters and returns their gradients.

    A reconstructing or stored-input stage is one node per residual step, so that while step s runs its
    VJP autograd holds only the gradient at x_{s+1} (a Function cannot free the gradient it was given, so
    one node for the whole stage kept the stage's incoming gradient alive through every step). Parameter
    gradients still reach autograd once per backward, from this node, after every step has run: DDP hooks
    fire once, and an approximate gradient can still be replaced by the exact one (``fallback``).
    """

    @staticmethod
    def forward(ctx: Any, run: StageRun, x: torch.Tensor, *params: torch.nn.Parameter) -> torch.Tensor:
        stage = run.stage
        run.autocast = AutocastState.capture(x.device.type)
        run.state_dtype = x.dtype
        run.needs_input_grad = bool(ctx.needs_input_grad[1])
        ctx.run, ctx.input_dtype = run, x.dtype
        run.gradient, run.block_dtype = stage.gradient, stage.block_dtype
        # only BatchNorm (batch statistics) makes few values per channel dangerous; other stages are unaffected
        values = values_per_channel(x) if stage.has_batchnorm() else None
        stage.last_values_per_channel = values
        few_values = values is not None and values < MIN_VALUES_PER_CHANNEL
        if few_values and (stage.gradient == "adjoint" or stage.block_dtype is not None):
            # BatchNorm normalises each channel over so few values that its batch variance can be tiny by
            # chance and magnify any error of an approximate input (a reconstruction's or a 16-bit one's) up
            # to O(1); the state is tiny there, so it is stored exactly for this call
            run.gradient, run.block_dtype = "block", None
        compressed = run.gradient == "block" and run.block_dtype is not None
        keep_x0 = run.head_input is None and (
            (run.gradient == "adjoint" and (stage.keep_input or stage.fallback)) or (compressed and stage.fallback)
        )
        run.pending = {
            "x_in": x if keep_x0 else None,
            "head_input": run.head_input,
            "x_out": None,
            "anchors": {},
            "top_increment": None,
            "step_inputs": [],
            "stored_finite": [],
        }
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        run: StageRun = ctx.run
        stage = run.stage
        _refuse_double_backward(stage)
        del grad  # a placeholder: step 0 handed the real gradient over on the run
        head_run = run.head_run
        try:
            with record_function(f"resode::{stage.display_name}::{run.gradient}"), run.autocast.replayed():
                real = run.chain.pop("grad", None)
                if run.gradient == "block":
                    grad_x, param_grads = _finish_block(run, real)
                else:
                    grad_x, param_grads = _finish_adjoint(run, real)
                del real
        finally:
            report = run.report
            run.release()
        if report is not None:
            report.block_forwards = run.block_forwards
            stage.last_backward = report
        if grad_x is None:
            return (None, None, *param_grads)
        grad_x = grad_x.to(ctx.input_dtype)
        if head_run is not None:  # the stage's own head node is next: hand the gradient over
            head_run.incoming = grad_x
            return (None, _placeholder_like(grad_x), *param_grads)
        return (None, grad_x, *param_grads)


class StageStepFunction(torch.autograd.Function):
    """One residual step x_{s+1} = Phi_s(x_s) of a chain (see ``StageEntryFunction``)."""

    @staticmethod
    def forward(ctx: Any, run: StageRun, s: int, h: torch.Tensor) -> torch.Tensor:
        stage = run.stage
        pending = run.pending
        adjoint = run.gradient == "adjoint"
        steps = stage.num_steps
        if run.gradient == "block":
            pending["step_inputs"].append(_stored_input(run, h, pending["stored_finite"]))
        out, _ = stage.scheme_impl.step(s, h, run.evaluator("record"))
        stage.check_shape(s, h, out)
        if adjoint and s == steps - 1 and stage.top_step_dtype is not None:
            pending["top_increment"] = (out - h).to(stage.top_step_dtype)
        if adjoint and stage.anchor_every and (s + 1) % stage.anchor_every == 0 and s + 1 < steps:
            pending["anchors"][str(s + 1)] = out
        if s == steps - 1:
            if adjoint:
                pending["x_out"] = out
            run.keep(pending)
            run.pending = None
        ctx.run, ctx.step = run, s
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: StageRun = ctx.run
        stage, s = run.stage, ctx.step
        _refuse_double_backward(stage)
        if s == stage.num_steps - 1:
            _begin_chain(run, grad)
            if run.gradient == "block" and run.chain["held"]["stored_finite"]:
                _check_stored_inputs(run, grad)  # may compute the whole stage's exact gradient right here
        if run.chain.get("done"):  # the exact gradient was already computed at the top step: pass it on
            return None, None, (None if run.chain.get("grad") is None else _placeholder_like(run.chain["grad"]))
        batchnorms = stage.batchnorm_modules([stage.residual_block(n) for n in stage.scheme_impl.blocks_of_step(s)])
        # the top step's gradient comes from outside the stage (autograd holds it anyway); the others were
        # handed down on the run by the step above, and ``grad`` is a placeholder
        holder = [grad if s == stage.num_steps - 1 else run.chain.pop("grad")]
        del grad
        with record_function(f"resode::{stage.display_name}::{run.gradient}"), batch_counters_preserved(batchnorms), run.autocast.replayed():
            if run.gradient == "block":
                grad_x = _block_step(run, s, holder)
            else:
                grad_x = _adjoint_step(run, s, holder)
        if grad_x is None:
            return None, None, None
        run.chain["grad"] = grad_x
        return None, None, _placeholder_like(grad_x)


def _refuse_double_backward(stage: "AdjointSequential") -> None:
    if torch.is_grad_enabled():
        raise DoubleBackwardError(
            f"stage {stage.display_name}: double backward (create_graph=True) through an adjoint stage "
            "is not supported; use scheme='backprop' for this stage to differentiate twice"
        )


def _begin_chain(run: StageRun, grad_out: torch.Tensor) -> None:
    """At the top step: take what the forward kept and set up the state the steps hand down."""
    stage = run.stage
    held = run.take()
    run.block_forwards = 0
    run.report = BackwardReport(
        scheme=stage.scheme,
        gradient=run.gradient,
        steps=stage.num_steps,
        block_forwards=0,
        anchor_count=len(held.get("anchors") or {}),
    )
    chain: dict[str, Any] = {"held": held, "param_grads": {}, "finite_flags": [], "cache": None}
    if run.gradient == "adjoint":
        x_out = held.pop("x_out")
        chain["work_dtype"] = _work_dtype(x_out.dtype)
        chain["x_next"] = x_out.to(chain["work_dtype"])
        # kept to explain a non-finite reconstruction: the output's finiteness, not the tensor
        chain["output_finite"] = torch.isfinite(x_out.sum()) if stage.check_finite else None
        del x_out
        # the exact fallback restarts from the stage's incoming gradient: kept only where it can happen
        chain["grad_out"] = grad_out if stage.fallback else None
        chain["grad_out_finite"] = torch.isfinite(grad_out.sum()) if stage.check_finite else None
    run.chain = chain


def _wants_input_grad(run: StageRun, s: int) -> bool:
    return s > 0 or run.needs_input_grad


def _block_step(run: StageRun, s: int, holder: list[torch.Tensor]) -> torch.Tensor | None:
    """VJP of step s from its stored (possibly compressed) input, which is dropped here."""
    chain = run.chain
    x_s = chain["held"]["step_inputs"].pop()
    x_s = x_s.to(run.state_dtype)  # the only reference to the compressed copy goes here
    grad_x, step_grads, _ = _step_vjp(run, s, x_s, holder, _wants_input_grad(run, s), want_cache=False)
    del x_s
    _accumulate(chain["param_grads"], [p for p, _ in step_grads], [g for _, g in step_grads])
    return grad_x


def _adjoint_step(run: StageRun, s: int, holder: list[torch.Tensor]) -> torch.Tensor | None:
    """Reconstruct x_s from x_{s+1} (dropped here), then the VJP of step s at it."""
    stage, chain = run.stage, run.chain
    with torch.no_grad():
        x_s = _reconstruct(run, s, chain.pop("x_next"), chain.pop("cache"), chain["held"], chain["work_dtype"])
    want_x = _wants_input_grad(run, s)
    grad_x, step_grads, cache = _step_vjp(run, s, x_s, holder, want_x, want_cache=s > 0 and stage.scheme_impl.uses_cache)
    if stage.check_finite:
        # A sum is non-finite iff some entry is (or it overflows, which is as bad): one cheap pass each.
        # Parameter gradients are products of these two and finite weights, so checking them adds nothing.
        chain["finite_flags"].append(torch.isfinite(x_s.sum() + grad_x.sum() if want_x else x_s.sum()))
    _accumulate(chain["param_grads"], [p for p, _ in step_grads], [g for _, g in step_grads])
    chain["x_next"], chain["cache"] = x_s, cache
    return grad_x


def _exact_chain_input(run: StageRun) -> torch.Tensor | None:
    """The chain's exact input: kept as is, or (the head being its own node) recomputed from the stage input
    without a graph; None when neither was kept."""
    held = run.chain["held"]
    if held.get("head_input") is None:
        return held.get("x_in")
    with torch.no_grad(), batch_counters_preserved(run.stage.batchnorm_modules()):
        return run.run_head(held["head_input"], "exact")


def _finish_block(run: StageRun, grad: torch.Tensor | None):
    return (grad if run.needs_input_grad else None), _ordered(run, run.chain["param_grads"])


#: an approximate method (a reconstruction, a 16-bit input) is used only where each BatchNorm channel of the
#: stage normalises over at least this many values (batch × height × width): over fewer, the batch variance can
#: be tiny by chance and divides the input's error up to O(1) (measured: 2 images at 1×1 gave whole-model
#: cosines down to -0.96 with float16 inputs, and NaN with a reconstruction). Where it applies the state is
#: small (e.g. a 1×1 layer4), so storing it exactly costs next to nothing.
MIN_VALUES_PER_CHANNEL = 64


def values_per_channel(x: torch.Tensor) -> int:
    """How many values a BatchNorm over a state like x normalises each channel over (batch × spatial)."""
    return x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else x.numel()


def _stored_input(run: StageRun, h: torch.Tensor, finite: list[torch.Tensor]) -> torch.Tensor:
    """What a ``block`` stage keeps of a step input: compressed where that is safe, else as is."""
    dtype = run.block_dtype
    if dtype is None or dtype == h.dtype:  # (None also where BatchNorm sees too few values: see the entry node)
        return h
    stored = h.to(dtype)
    if run.stage.check_finite:  # overflow of the 16-bit type (or a non-finite input): known before the backward
        finite.append(torch.isfinite(torch.sum(stored, dtype=torch.float32)))
    return stored


def _check_stored_inputs(run: StageRun, grad_out: torch.Tensor) -> None:
    """Before any step's VJP: a compressed input that is not finite cannot give a gradient.

    With ``fallback`` (the auto policy) the stage's exact gradient is computed at once from its exact input,
    replaying the forward's BatchNorm statistics, and the policy is told; otherwise ``ReconstructionError``.
    """
    stage, chain = run.stage, run.chain
    if bool(torch.stack(chain["held"]["stored_finite"]).all()):
        return
    held = chain["held"]
    stored_input = held.get("head_input") if held.get("head_input") is not None else held.get("x_in")
    input_diverged = stored_input is not None and not bool(torch.isfinite(stored_input).all())
    if input_diverged or not bool(torch.isfinite(grad_out).all()):
        raise ReconstructionError(
            f"stage {stage.display_name}: the stage's input or the gradient arriving from the layers above is not "
            "finite, so the training had already diverged (or the data has NaN/inf); no gradient was returned, so "
            "the weights are untouched. Lower the learning rate, check the data, or use gradient clipping"
        )
    reason = f"a block input does not fit {run.block_dtype} (overflow)"
    x_in = _exact_chain_input(run) if stage.fallback else None
    if x_in is not None:
        chain["held"]["step_inputs"].clear()
        report = run.report
        report.fell_back, report.fallback_reason = True, reason
        stage.note_fallback(reason)
        with batch_counters_preserved(stage.batchnorm_modules()), run.autocast.replayed():
            grad_x, grads = _exact_backward(run, x_in, grad_out, run.needs_input_grad, mode="substitute")
        chain["param_grads"] = {id(p): g for p, g in zip(run.params, grads) if g is not None}
        chain["grad"] = grad_x
        chain["done"] = True
        return
    raise ReconstructionError(
        f"stage {stage.display_name}: {reason}: a value of its input exceeds the type's range; no gradient was "
        "returned, so the weights are untouched. Use scheme='auto' (falls back to the exact gradient and "
        "measures again), 'block_bf16' (the range of float32) or 'block' for this stage"
    )


def _finish_adjoint(run: StageRun, grad: torch.Tensor | None):
    """Check the reconstruction at the chain's input; fall back to the exact gradient or raise if it failed."""
    stage, chain = run.stage, run.chain
    report: BackwardReport = run.report
    steps = stage.num_steps
    x_hat = chain.pop("x_next")
    chain.pop("cache", None)
    flags = chain["finite_flags"]
    bad_step = None
    if flags:
        ok = torch.stack(flags)
        if not bool(ok.all()):
            bad_step = steps - 1 - int((~ok).nonzero()[0])
    x_in = _exact_chain_input(run)
    if bad_step is not None:
        if stage.fallback and x_in is not None:
            del x_hat, grad
            return _fall_back(run, x_in, report, f"non-finite reconstruction of block {stage.exact_head + bad_step}")
        raise ReconstructionError(_non_finite_message(stage, bad_step, chain["grad_out_finite"], chain["output_finite"]))
    if x_in is not None:
        report.reconstruction_error = _relative_error_in_place(x_hat, x_in)
        del x_hat
        if stage.fallback and not report.reconstruction_error <= stage.max_reconstruction_error:
            del grad
            return _fall_back(
                run, x_in, report,
                f"reconstruction error {report.reconstruction_error:.3g} > {stage.max_reconstruction_error:.3g}",
            )
    return (grad if run.needs_input_grad else None), _ordered(run, chain["param_grads"])


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


class _GradientFromHolder(torch.autograd.Function):
    """A scalar root for a VJP whose backward takes the real output gradient out of a list.

    ``torch.autograd.grad(out, inputs, grad)`` keeps ``out`` and ``grad`` alive until it returns (the call
    holds them), although autograd needs ``grad`` only for the first op of the VJP and ``out`` only as what
    that op saved. Starting from this root instead, the list holds the only reference to the gradient and
    the caller drops ``out``: both are freed as soon as the VJP's first op has used them.
    """

    @staticmethod
    def forward(ctx: Any, holder: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        ctx.holder = holder
        return out.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _unit: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, ctx.holder.pop()


def _placeholder_like(t: torch.Tensor) -> torch.Tensor:
    """A zero gradient of t's shape that allocates nothing (autograd only checks shape, dtype and device).

    Nodes of one stage hand their real gradients to each other on the run (``chain["grad"]``) and give
    autograd this instead, so autograd holds no state-sized gradient while the next node runs.
    """
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def _vjp(root: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    return torch.autograd.grad(root, inputs, allow_unused=True) if inputs else ()


def _step_vjp(run: StageRun, s: int, x_s: torch.Tensor, holder: list[torch.Tensor], want_x: bool, want_cache: bool):
    """VJP of step s at x_s (BatchNorm with the forward's statistics) of the gradient in ``holder``.

    Returns (grad wrt x_s or None, param grads, the scheme's cache or None).
    """
    stage = run.stage
    step_params = stage.params_of_step(s, run.params)
    with torch.enable_grad(), record_function(f"resode::step{s}"):
        x_leaf = x_s.detach()
        if x_leaf.dtype != run.state_dtype:
            x_leaf = x_leaf.to(run.state_dtype)
        x_leaf.requires_grad_(want_x)
        out, cache = stage.scheme_impl.step(s, x_leaf, run.evaluator("substitute"))
        cache = (cache.detach() if isinstance(cache, torch.Tensor) else cache) if want_cache else None
        root = _GradientFromHolder.apply(holder, out)
        del out
        inputs = ([x_leaf] if want_x else []) + step_params
        grads = _vjp(root, inputs)
        del root
    grad_x = None
    if want_x:
        grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x_leaf)
        grads = grads[1:]
    return grad_x, list(zip(step_params, grads)), cache


def _head_vjp(run: StageRun, x_in: torch.Tensor, holder: list[torch.Tensor], needs_input_grad: bool):
    """Recompute the exact head from the stored stage input and back-propagate the gradient in ``holder``.

    Returns (grad wrt the stage input, param grads).
    """
    head_params = run.stage.params_of_head(run.params)
    with torch.enable_grad(), record_function("resode::head"):
        x = x_in.detach().requires_grad_(needs_input_grad)
        root = _GradientFromHolder.apply(holder, run.run_head(x, "exact"))
        inputs = ([x] if needs_input_grad else []) + head_params
        grads = _vjp(root, inputs)
        del root
    grad_x = None
    if needs_input_grad:
        grad_x, grads = grads[0], grads[1:]
    return grad_x, list(zip(head_params, grads))


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


def _fall_back(run: StageRun, x_in: torch.Tensor, report: BackwardReport, reason: str):
    """Replace this backward's approximate gradient by the exact one, recomputed from the chain's exact input."""
    report.fell_back, report.fallback_reason = True, reason
    run.stage.note_fallback(reason)
    grad_out = run.chain.pop("grad_out")
    run.chain["param_grads"] = {}
    with batch_counters_preserved(run.stage.batchnorm_modules()):
        return _exact_backward(run, x_in, grad_out, run.needs_input_grad, mode="substitute")


def _non_finite_message(stage: "AdjointSequential", bad_step: int, grad_out_finite: torch.Tensor | None, output_finite: torch.Tensor | None) -> str:
    """Say whether the stage's reconstruction failed, or the training had already diverged before it."""
    if grad_out_finite is not None and not bool(grad_out_finite):
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
