"""The discrete adjoint as one autograd Function.

Forward: run the stage without building a graph; keep the stage output x_S (and, if asked, the stage input,
anchors every K steps, the top step's increment, and the few bytes that make recomputation replay the forward: BatchNorm statistics,
generator states). Backward, for s = S-1 … 0:

    x̂_s  = reverse(x̂_{s+1})                    reconstruct the step's input (scheme), optionally refined
    x_out = Phi_s(x̂_s)  with autograd           one step's working set, freed after its VJP
    ∂L/∂x_s, ∂L/∂θ_s += vjp(x_out, ∂L/∂x_{s+1})

Parameters are inputs of the Function, so each receives its gradient exactly once per backward (DDP
hooks fire once; tied parameters are summed here). Blocks in the exact head (the shape-changing first
blocks of a timm stage) are recomputed from the stored stage input, which also gives the exact
reconstruction error at the adjoint part's input for free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import DoubleBackwardError, ReconstructionError
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


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reconstruction arithmetic runs in at least float32, whatever autocast did to the blocks."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    truth = truth.to(estimate.dtype)
    return float(torch.linalg.vector_norm(estimate - truth) / torch.linalg.vector_norm(truth).clamp_min(1e-30))


@dataclass
class StageRun:
    """Per-call state shared by forward and backward of one stage application."""

    stage: "AdjointSequential"
    params: list[torch.nn.Parameter]
    replay: BatchNormReplay = field(default_factory=BatchNormReplay)
    rng: dict[Any, RngSnapshot] = field(default_factory=dict)
    autocast: AutocastState | None = None
    block_forwards: int = 0

    # ------------------------------------------------------------------ evaluation with replay
    def call(self, block: torch.nn.Module, x: torch.Tensor, key: Any, mode: str) -> torch.Tensor:
        """Run ``block`` at x as the forward evaluation ``key`` (BatchNorm routed by ``mode``).

        In the forward (modes ``record``/``forward``) the generator state is kept when the block drew
        random numbers; in recomputation it is restored around the call.
        """
        if mode in ("record", "forward"):
            before = RngSnapshot.capture(x.device) if self.stage.preserve_rng_state else None
            with self.replay.evaluation(mode, key):
                out = block(x)
            if before is not None and not before.same_as(RngSnapshot.capture(x.device)):
                self.rng[key] = before
            return out
        snapshot = self.rng.get(key)
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
        for i, block in enumerate(self.stage.head_blocks()):
            x = self.call(block, x, ("head", i), mode)
        return x

    # ------------------------------------------------------------------ saved tensors
    def pack(self, tensors: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Flatten what backward needs so it all goes through ``save_for_backward`` (and is measured)."""
        flat: list[torch.Tensor] = []
        layout: dict[str, Any] = {}

        def put(t: torch.Tensor) -> int:
            flat.append(t)
            return len(flat) - 1

        for name, value in tensors.items():
            layout[name] = None if value is None else (
                {k: put(v) for k, v in value.items()} if isinstance(value, dict) else put(value)
            )
        layout["bn"] = {k: [(put(m), put(v)) for m, v in recs] for k, recs in self.replay.records.items()}
        layout["rng"] = {k: [put(t) for t in snap.tensors()] for k, snap in self.rng.items()}
        self._rng_devices = {k: snap.device for k, snap in self.rng.items()}
        # from here on, backward gets them back through unpack (so saved-tensor hooks, e.g. offloading, apply)
        self.replay.records, self.rng = {}, {}
        return flat, layout

    def unpack(self, saved: tuple[torch.Tensor, ...], layout: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, where in layout.items():
            if name in ("bn", "rng"):
                continue
            if where is None:
                out[name] = None
            elif isinstance(where, dict):
                out[name] = {k: saved[i] for k, i in where.items()}
            else:
                out[name] = saved[where]
        self.replay.records = {k: [(saved[m], saved[v]) for m, v in recs] for k, recs in layout["bn"].items()}
        self.rng = {
            k: RngSnapshot(saved[idx[0]], self._rng_devices[k], saved[idx[1]] if len(idx) > 1 else None)
            for k, idx in layout["rng"].items()
        }
        return out


class AdjointStageFunction(torch.autograd.Function):
    """Memory-free backward through one residual stage (see module docstring)."""

    @staticmethod
    def forward(ctx: Any, run: StageRun, x: torch.Tensor, *params: torch.nn.Parameter) -> torch.Tensor:
        stage = run.stage
        run.autocast = AutocastState.capture(x.device.type)
        exact = stage.gradient == "checkpoint"
        x_in = x
        ctx.input_dtype = x.dtype
        h = run.run_head(x, "forward")
        keep_x0 = stage.keep_input and stage.exact_head == 0 and not exact
        anchors: dict[str, torch.Tensor] = {}
        scheme, record = stage.scheme_impl, run.evaluator("forward" if exact else "record")
        steps = stage.num_steps
        top_increment = None
        for s in range(steps):
            out, _ = scheme.step(s, h, record)
            stage.check_shape(s, h, out)
            if s == steps - 1 and stage.top_step_dtype is not None and not exact:
                top_increment = (out - h).to(stage.top_step_dtype)
            h = out
            if stage.anchor_every and (s + 1) % stage.anchor_every == 0 and s + 1 < steps:
                anchors[str(s + 1)] = h
        keep_stage_input = exact or stage.exact_head > 0 or keep_x0
        flat, layout = run.pack(
            {
                "x_in": x_in if keep_stage_input else None,
                "x_out": None if exact else h,
                "anchors": anchors,
                "top_increment": top_increment,
            }
        )
        ctx.save_for_backward(*flat)
        ctx.run, ctx.layout = run, layout
        ctx.keep_x0 = keep_x0
        return h

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: StageRun = ctx.run
        stage = run.stage
        if torch.is_grad_enabled():
            raise DoubleBackwardError(
                f"stage {stage.display_name}: double backward (create_graph=True) through an adjoint stage "
                "is not supported; use gradient='backprop' for this stage to differentiate twice"
            )
        saved = run.unpack(ctx.saved_tensors, ctx.layout)
        needs_input_grad = ctx.needs_input_grad[1]
        run.block_forwards = 0
        with batch_counters_preserved(stage.batchnorm_modules()), run.autocast.replayed():
            if stage.gradient == "checkpoint":
                grad_x, param_grads, x0_error = _exact_backward(run, saved["x_in"], grad_out, needs_input_grad)
            else:
                grad_x, param_grads, x0_error = _adjoint_backward(
                    run, saved, grad_out, needs_input_grad, ctx.keep_x0
                )
        if grad_x is not None:
            grad_x = grad_x.to(ctx.input_dtype)
        stage.last_backward = BackwardReport(
            scheme=stage.scheme,
            gradient=stage.gradient,
            steps=stage.num_steps,
            block_forwards=run.block_forwards,
            reconstruction_error=x0_error,
            anchor_count=len(saved.get("anchors") or {}),
        )
        return (None, grad_x, *param_grads)


def _accumulate(param_grads: dict[int, torch.Tensor], params: list[torch.nn.Parameter], grads) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        key = id(p)
        param_grads[key] = g if key not in param_grads else param_grads[key] + g


def _ordered(run: StageRun, param_grads: dict[int, torch.Tensor]) -> list[torch.Tensor | None]:
    return [param_grads.get(id(p)) for p in run.params]


def _exact_backward(run: StageRun, x_in: torch.Tensor, grad_out: torch.Tensor, needs_input_grad: bool):
    """Checkpointing: recompute the whole stage from its input with autograd, then one VJP. Exact."""
    stage = run.stage
    with torch.enable_grad():
        x = x_in.detach().requires_grad_(needs_input_grad)
        h = run.run_head(x, "exact")
        evaluate = run.evaluator("exact")
        for s in range(stage.num_steps):
            h, _ = stage.scheme_impl.step(s, h, evaluate)
        inputs = ([x] if needs_input_grad else []) + run.params
        grads = torch.autograd.grad(h, inputs, grad_out, allow_unused=True)
    grad_x = grads[0] if needs_input_grad else None
    return grad_x, list(grads[1:] if needs_input_grad else grads), None


def _adjoint_backward(run: StageRun, saved: dict, grad_out: torch.Tensor, needs_input_grad: bool, keep_x0: bool):
    stage, scheme = run.stage, run.stage.scheme_impl
    frozen, substitute = run.evaluator("frozen"), run.evaluator("substitute")
    anchors = saved["anchors"] or {}
    param_grads: dict[int, torch.Tensor] = {}
    work_dtype = _work_dtype(saved["x_out"].dtype)
    x_next = saved["x_out"].detach().to(work_dtype)
    grad = grad_out
    cache = None
    finite_flags: list[torch.Tensor] = []
    steps = stage.num_steps
    need_grad_below = needs_input_grad or stage.exact_head > 0
    for s in reversed(range(steps)):
        with torch.no_grad():
            if str(s) in anchors:
                x_s = anchors[str(s)].detach().to(work_dtype)
            elif s == steps - 1 and saved["top_increment"] is not None:
                x_s = x_next - saved["top_increment"].to(work_dtype)
            else:
                x_s = scheme.reverse(s, x_next, cache, frozen).to(work_dtype)
                for _ in range(stage.refine):
                    x_s = x_s - (scheme.step(s, x_s, frozen)[0] - x_next)
        step_params = stage.params_of_step(s, run.params)
        want_x = s > 0 or need_grad_below
        with torch.enable_grad():
            x_leaf = x_s.detach().requires_grad_(want_x)
            out, cache = scheme.step(s, x_leaf, substitute)
            inputs = ([x_leaf] if want_x else []) + step_params
            grads = torch.autograd.grad(out, inputs, grad, allow_unused=True) if inputs else ()
        cache = cache.detach() if isinstance(cache, torch.Tensor) else cache
        if want_x:
            grad = grads[0] if grads[0] is not None else torch.zeros_like(x_leaf)
            grads = grads[1:]
        if stage.check_finite:
            # A sum is non-finite iff some entry is (or it overflows, which is as bad): one cheap pass each.
            # Parameter gradients are products of these two and finite weights, so checking them adds nothing.
            checked = x_s.sum() + grad.sum() if want_x else x_s.sum()
            finite_flags.append(torch.isfinite(checked))
        _accumulate(param_grads, step_params, grads)
        x_next = x_s
    if finite_flags:
        flags = torch.stack(finite_flags)
        if not bool(flags.all()):
            first_bad_step = steps - 1 - int((~flags).nonzero()[0])
            raise ReconstructionError(
                f"stage {stage.display_name}: non-finite values in the reconstruction of block "
                f"{stage.exact_head + first_bad_step} or in its gradient (scheme {stage.scheme!r}); no gradient "
                "was returned, so the weights are untouched. "
                "Use refine>0, anchor_every, a higher-order scheme, or gradient='checkpoint' for this stage"
            )
    x0_hat = x_next
    x0_error = None
    grad_x = grad if needs_input_grad else None
    if stage.exact_head > 0:
        head_params = stage.params_of_head(run.params)
        with torch.enable_grad():
            x = saved["x_in"].detach().requires_grad_(needs_input_grad)
            x0 = run.run_head(x, "exact")
            inputs = ([x] if needs_input_grad else []) + head_params
            grads = torch.autograd.grad(x0, inputs, grad, allow_unused=True) if inputs else ()
        x0_error = _relative_error(x0_hat, x0.detach())
        if needs_input_grad:
            grad_x, grads = grads[0], grads[1:]
        _accumulate(param_grads, head_params, grads)
    elif keep_x0:
        x0_error = _relative_error(x0_hat, saved["x_in"])
    return grad_x, _ordered(run, param_grads), x0_error
