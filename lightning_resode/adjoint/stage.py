"""``AdjointSequential``: an ``nn.Sequential`` of residual blocks whose backward stores no per-block activations."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import AdjointError, ShapeChangeError
from .function import run_chain, run_checkpoint
from .plan import PlanLog, planned_gradient
from .report import BackwardReport
from .schemes import SCHEMES, get_scheme
from .tape import ParameterBinding, Tape

Gradient = Literal["adjoint", "block", "checkpoint", "backprop"]
GRADIENTS: tuple[str, ...] = ("adjoint", "block", "checkpoint", "backprop")


#: what of a stage's recomputation can build ``lean`` graphs: the exact head, the residual steps, and in the head a
#: BatchNorm that recomputes a k×k convolution's output in its backward instead of saving it (k² products per
#: output value: the costliest of the forms, for the least memory where the convolution is strided)
LEAN_PARTS = ("head", "head_recompute", "steps")


def check_reconstruction_options(refine: Any, anchor_every: Any, prefix: str = "") -> None:
    """Refuse a ``refine`` or ``anchor_every`` a stage cannot run, naming it (``prefix``: e.g. the CLI's
    ``model.``); a float or bool would pass a range check and fail at the first backward."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(refine) or refine < 0:
        raise ValueError(f"{prefix}refine must be >= 0 (a whole number of Richardson iterations per reconstruction), got {refine!r}")
    if anchor_every is not None and (not whole(anchor_every) or anchor_every < 1):
        raise ValueError(
            f"{prefix}anchor_every must be a positive whole number of steps (keep the exact state every K steps) or None, got {anchor_every!r}"
        )


class AdjointSequential(nn.Module):
    """A residual stage trained with the discrete adjoint (Sander, Ablin & Peyré, NeurIPS 2022).

    Children are registered as ``"0"``, ``"1"``, … exactly like ``nn.Sequential``, so state_dict keys do
    not change when a timm stage is wrapped. The same block object may appear several times (weights tied
    across depth). The forward is numerically the plain composition (``euler``, ``euler_fast``) or the
    paper's Heun scheme (``heun``); only the backward differs.

    Args:
        blocks: residual blocks, each mapping a state to a state of the same shape.
        scheme: ``"euler"`` (paper; backward = 2 block forwards per block, gradient error O(1/N)),
            ``"euler_fast"`` (1 block forward per block, O(1/N)), ``"heun"`` (3 per step, O(1/N²)).
        gradient: ``"adjoint"`` (reconstruct activations backwards), ``"block"`` (store each step's input,
            in ``block_dtype`` if given, and start each step's VJP from it: exact uncompressed, otherwise only
            the input's rounding; memory grows with depth, but one state, not one block's graph, per block),
            ``"checkpoint"`` (recompute the stage from its stored input: exact, one stage of activations at
            backward time) or ``"backprop"`` (plain autograd: exact, stores everything). Users normally pick
            these through one method name (``configure(method=...)``, see ``lightning_resode.adjoint.methods``).
        block_dtype: with ``gradient="block"``, the dtype step inputs are stored in (``torch.float16``,
            ``torch.bfloat16``; ``None`` keeps the state's dtype: exact).
        refine: Richardson iterations per reconstruction, x ← x - (Phi(x) - x_next); each costs one step
            forward and shrinks the reconstruction error geometrically when residuals are contractive.
        anchor_every: keep the exact state every K steps, so reconstruction error cannot accumulate over
            more than K steps (memory: S/K states).
        top_step_dtype: keep the top step's increment x_S - x_{S-1} in this dtype (e.g. ``torch.bfloat16``):
            the top block's input is then recovered without a block forward and with no reverse-step error
            (only the rounding of the increment), for half a state of memory in bf16. This makes the backward
            cost one block forward per block with ``euler_fast``, as checkpointing does (one more per stage
            where the steps are lean: see ``lean_graphs``).
        store_every: with ``gradient="block"``, split the steps into runs and keep only each run's first input
            (exactly) at rest; in backward, each run is re-run forward from its kept input (no graph; BatchNorm
            with the forward's statistics) to recover its inputs, stored as ``block_dtype``. Memory at rest
            falls from S states to one per run, for one extra block forward per step whose input is not kept;
            the gradient is the one storing every input gives. An int K: runs of K steps. ``"auto"`` (default),
            in stages of 9 or more steps: runs that shorten towards the top (about sqrt(2S) of them), so that
            the kept inputs below a run plus the run's own inputs are as few as any split allows while the
            backward re-runs it; shallower stages store every input. ``None`` always stores every input.
        exact_head: how many leading blocks are shape-changing (a timm stage's downsampling block);
            they are recomputed exactly from the stored stage input instead of reconstructed.
        keep_input: keep the stage input (without a head) to measure the reconstruction error exactly.
        check_finite: raise ``ReconstructionError`` on non-finite reconstructions (one sync per backward).
        fallback: instead of raising, replace an adjoint backward whose reconstruction is non-finite or whose
            measured reconstruction error exceeds ``max_reconstruction_error``, or a 16-bit ``block`` backward
            whose stored input overflowed that type, by the exact gradient, recomputed from the stored stage input
            (kept for that purpose); the backward's report says so (``fell_back``), so a policy watching the
            stage's report hooks can move it to a safer method. The auto policy turns this on.
        max_reconstruction_error: the relative reconstruction error at the stage input above which
            ``fallback`` replaces the gradient (measured for free where the stage has an exact head).
        preserve_rng_state: replay dropout / drop-path draws in recomputation.
        lean_graphs: where recomputations build the leaner graph forms of ``lean`` (a BatchNorm that saves its
            convolution's input, 1×1 convolutions as matrix products, on the CPU a stored 16-bit input read as is,
            not upcast): ``True`` (every part of ``LEAN_PARTS``),
            ``False``, or some parts: ``"head"`` (the exact head), ``"head_recompute"`` (in the head, also where
            the convolution is k×k) and ``"steps"``. Less memory in the backward's working set, more time
            (resnet50 on the CPU: about a quarter of plain backprop's step). Gradients are the same either way up
            to float rounding, except for a reconstruction that reuses the step above's block output
            (``euler_fast``, ``heun``): with lean steps its top step keeps no cache (one state less) and the step
            below reverses by its own block. The auto policy turns them off where they lower the step's peak by
            3 % or less (never the steps of such a reconstruction: that would change the gradient it measured).
        name: shown in error messages and diagnostics (the converter sets e.g. ``"layer3"``).
    """

    #: class defaults, so stages pickled before these existed load with them
    store_every: int | str | None = "auto"
    _lean_parts: frozenset[str] = frozenset(LEAN_PARTS)

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        scheme: str = "euler",
        *,
        gradient: Gradient = "adjoint",
        refine: int = 0,
        anchor_every: int | None = None,
        top_step_dtype: torch.dtype | None = None,
        exact_head: int = 0,
        keep_input: bool = False,
        check_finite: bool = True,
        preserve_rng_state: bool = True,
        lean_graphs: bool | str = True,
        name: str | None = None,
        block_dtype: torch.dtype | None = None,
        fallback: bool = False,
        max_reconstruction_error: float = float("inf"),
        store_every: int | None | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        blocks = list(blocks)
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"block {i} is a {type(block).__name__}, expected an nn.Module")
            self.add_module(str(i), block)
        self.keep_input = keep_input
        self.check_finite = check_finite
        self.preserve_rng_state = preserve_rng_state
        self.lean_graphs = lean_graphs
        self.name = name
        self.fallback = fallback
        self.max_reconstruction_error = max_reconstruction_error
        self._report_hooks: OrderedDict[int, Callable[["AdjointSequential", BackwardReport], None]] = OrderedDict()
        self._last_report: BackwardReport | None = None
        self.configure(
            scheme=scheme,
            gradient=gradient,
            refine=refine,
            anchor_every=anchor_every,
            top_step_dtype=top_step_dtype,
            exact_head=exact_head,
            block_dtype=block_dtype,
            store_every=store_every,
        )

    def configure(
        self,
        *,
        scheme: str | None = None,
        gradient: Gradient | None = None,
        refine: int | None = None,
        anchor_every: int | None | Literal["keep"] = "keep",
        top_step_dtype: torch.dtype | None | Literal["keep"] = "keep",
        exact_head: int | None = None,
        block_dtype: torch.dtype | None | Literal["keep"] = "keep",
        method: str | None = None,
        store_every: int | None | Literal["auto", "keep"] = "keep",
    ) -> "AdjointSequential":
        """Change how the stage trains (the auto policy and fidelity callbacks switch stages with this).

        ``method`` is one name of ``lightning_resode.adjoint.methods.METHODS`` (``"euler_fast"``,
        ``"block_fp16"``, ``"checkpoint"``…) and sets scheme, gradient and block dtype together; the other
        arguments refine it. Arguments left out keep their value. Weights and state_dict keys are untouched.
        """
        if method is not None:
            from .methods import get_method

            spec = get_method(method)
            scheme = scheme if scheme is not None else spec.scheme
            gradient = gradient if gradient is not None else spec.gradient
            block_dtype = spec.block_dtype if block_dtype == "keep" else block_dtype
        scheme = self.__dict__.get("scheme") if scheme is None else scheme
        gradient = self.__dict__.get("gradient") if gradient is None else gradient
        refine = self.__dict__.get("refine") if refine is None else refine
        anchor_every = self.__dict__.get("anchor_every") if anchor_every == "keep" else anchor_every
        top_step_dtype = self.__dict__.get("top_step_dtype") if top_step_dtype == "keep" else top_step_dtype
        exact_head = self.__dict__.get("exact_head") if exact_head is None else exact_head
        block_dtype = self.__dict__.get("block_dtype") if block_dtype == "keep" else block_dtype
        store_every = self.store_every if store_every == "keep" else store_every
        from .methods import METHODS

        if scheme not in SCHEMES and scheme in METHODS:
            raise ValueError(
                f"{scheme!r} is a gradient method, not a reconstruction scheme (valid schemes: {sorted(SCHEMES)}); "
                f"use AdjointSequential(blocks).configure(method={scheme!r}), or to_adjoint(model, scheme={scheme!r})"
            )
        scheme_impl = get_scheme(scheme)
        if block_dtype is not None and not (isinstance(block_dtype, torch.dtype) and block_dtype.is_floating_point):
            raise ValueError(f"block_dtype must be a floating torch.dtype or None, got {block_dtype!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {gradient!r}; valid: {list(GRADIENTS)}")
        check_reconstruction_options(refine, anchor_every)
        if top_step_dtype is not None and not (isinstance(top_step_dtype, torch.dtype) and top_step_dtype.is_floating_point):
            raise ValueError(f"top_step_dtype must be a floating torch.dtype or None, got {top_step_dtype!r}")
        if store_every not in (None, "auto") and not (isinstance(store_every, int) and not isinstance(store_every, bool) and store_every >= 1):
            raise ValueError(f"store_every must be a positive number of steps, 'auto' or None, got {store_every!r}")
        if not 0 <= exact_head <= len(self._blocks):
            raise ValueError(
                f"exact_head must be between 0 and {len(self._blocks)} (the number of blocks), got {exact_head}"
            )
        residual_blocks = len(self._blocks) - exact_head
        self.num_steps = scheme_impl.num_steps(residual_blocks) if residual_blocks > 0 else 0
        self.scheme, self.scheme_impl, self.gradient = scheme, scheme_impl, gradient
        self.refine, self.anchor_every, self.exact_head = refine, anchor_every, exact_head
        self.top_step_dtype = top_step_dtype
        self.block_dtype = block_dtype
        self.store_every = store_every
        return self

    @property
    def lean_graphs(self) -> frozenset[str]:
        """The parts (of ``LEAN_PARTS``) that recompute with the leaner graphs; set with a bool, a part or parts."""
        return self._lean_parts

    @lean_graphs.setter
    def lean_graphs(self, value: bool | str | Iterable[str]) -> None:
        valid = f"valid: True, False, one part or a list of parts of {list(LEAN_PARTS)}"
        if isinstance(value, bool):
            parts = frozenset(LEAN_PARTS) if value else frozenset()
        elif isinstance(value, str):
            parts = frozenset([value])
        elif isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in value):
            parts = frozenset(value)
        else:
            raise ValueError(f"lean_graphs: {value!r} is not a setting; {valid}")
        unknown = sorted(parts - set(LEAN_PARTS))
        if unknown:
            raise ValueError(f"lean_graphs: unknown part(s) {unknown}; {valid}")
        if "head_recompute" in parts and "head" not in parts:
            raise ValueError("lean_graphs: 'head_recompute' is a form of the head's lean graph and needs 'head' too")
        self._lean_parts = parts

    @property
    def method(self) -> str:
        """This stage's gradient method as one name (``lightning_resode.adjoint.methods``)."""
        from .methods import method_name

        return method_name(self)

    # ------------------------------------------------------------------ reports out
    def register_report_hook(self, hook: Callable[["AdjointSequential", BackwardReport], None]) -> RemovableHandle:
        """Call ``hook(stage, report)`` after each backward of this stage (like ``register_forward_hook``).

        The report says what the call ran (its ``plan``: method, and why it differs from the stage's), the
        reconstruction error where the exact input was kept, block forwards, and whether an exact fallback
        replaced the gradient. Measurement calls (``lightning_resode.adjoint.planned``) report too, with
        ``report.plan.measurement`` set. Returns a handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._report_hooks)
        self._report_hooks[handle.id] = hook
        return handle

    @property
    def last_backward(self) -> BackwardReport | None:
        """The report of this stage's last training backward (measurements excluded); for interactive use —
        programs that act on reports should register a hook instead."""
        return self._last_report

    def _publish(self, report: BackwardReport, logs: tuple[PlanLog, ...]) -> None:
        """Hand one backward's report out: to the measurement contexts it ran under, and to the hooks."""
        if report.plan is None or not report.plan.measurement:
            self._last_report = report
        for log in logs:
            log.reports[id(self)] = report
        for hook in list(self._report_hooks.values()):
            hook(self, report)

    @property
    def _blocks(self) -> list[nn.Module]:
        # read from the registered children every time, so replacing stage["1"] after construction takes effect
        return list(self._modules.values())

    # ------------------------------------------------------------------ nn.Sequential look-alike
    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, index: int) -> nn.Module:
        return self._blocks[index]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._blocks)

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, scheme={self.scheme!r}, gradient={self.gradient!r}, refine={self.refine}, "
            f"anchor_every={self.anchor_every}, top_step_dtype={self.top_step_dtype}, exact_head={self.exact_head}, "
            f"store_every={self.store_every!r}"
            + ("" if self.lean_graphs == set(LEAN_PARTS) else f", lean_graphs={sorted(self.lean_graphs)}")
        )

    @property
    def display_name(self) -> str:
        return self.name or f"AdjointSequential({len(self)} blocks)"

    # ------------------------------------------------------------------ structure
    def head_blocks(self) -> list[nn.Module]:
        return self._blocks[: self.exact_head]

    def residual_block(self, n: int) -> nn.Module:
        return self._modules[str(self.exact_head + n)]

    def batchnorm_modules(self, blocks: Iterable[nn.Module] | None = None) -> list[nn.Module]:
        """BatchNorm-like modules (with a batch counter) of the stage, or of the given blocks."""
        modules = self.modules() if blocks is None else (m for block in blocks for m in block.modules())
        return [m for m in modules if _is_batchnorm(m)]

    def has_batchnorm(self) -> bool:
        return any(_is_batchnorm(m) for m in self.modules())

    def check_shape(self, s: int, x: torch.Tensor, out: torch.Tensor) -> None:
        if out.shape != x.shape:
            n = self.exact_head + s
            raise ShapeChangeError(
                f"stage {self.display_name}: block {n} ({type(self._blocks[n]).__name__}) maps a state of shape "
                f"{tuple(x.shape)} to {tuple(out.shape)}; blocks of an adjoint stage must keep the shape. "
                f"Put shape-changing leading blocks in the exact head (exact_head={n + 1} if it is the first "
                "ones) or leave this stage unconverted"
            )

    def _reject_input_dtype(self, x: torch.Tensor) -> None:
        """An input of another dtype than the weights fails in the first convolution, deep inside the engine's
        replay: say so here, as the plain network would have failed, naming both (autocast casts on its own)."""
        weight = _first_floating_parameter(self)
        if weight is None or x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
            return
        model_too = f" or the model (model.to({x.dtype}))" if x.is_floating_point() else ""
        raise TypeError(
            f"stage {self.display_name}: the input is {x.dtype} but the weights are {weight.dtype}; convert the "
            f"images (x.to({weight.dtype})){model_too}, or run under torch.autocast"
        )

    def _reject_sync_batchnorm(self) -> None:
        # SyncBatchNorm all-gathers statistics; replaying it in backward would issue collectives that the
        # other ranks do not match (or match in another order). Per-device BatchNorm replays exactly.
        for name, module in self.named_modules():
            if module is not self and isinstance(module, AdjointSequential) and module.gradient != "backprop":
                raise AdjointError(
                    f"stage {self.display_name}: {name} is itself an adjoint stage; nested adjoint stages are not "
                    "supported (the inner one would recompute on its own inside the outer recomputation). "
                    "Flatten the blocks into one stage, or give the inner stage gradient='backprop'"
                )
            if isinstance(module, nn.SyncBatchNorm):
                raise AdjointError(
                    f"stage {self.display_name}: {name or 'a block'} is a SyncBatchNorm, which cannot be replayed "
                    "in an adjoint stage (its recomputation would issue unmatched collectives). Use plain "
                    "BatchNorm (per-device statistics; Lightning: sync_batchnorm=False) or gradient='backprop' "
                    "for this stage"
                )

    # ------------------------------------------------------------------ forward
    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's function with ordinary autograd (what eval, no_grad and ``gradient='backprop'`` run)."""
        for block in self.head_blocks():
            x = block(x)
        evaluate = lambda n, h, key: self.residual_block(n)(h)  # noqa: E731
        traced = _traced(x)
        for s in range(self.num_steps):
            out, _ = self.scheme_impl.step(s, x, evaluate)
            if not traced:  # a traced shape is symbolic: the plain network's own ops are what tracing records
                self.check_shape(s, x, out)
            x = out
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()) or _traced(x) or x.numel() == 0:
            return self.plain_forward(x)  # (an empty batch keeps nothing: autograd's graph is free, as in timm)
        return self._training_forward(x)

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(
            f"stage {self.display_name}: TorchScript cannot compile an adjoint stage's training engine; script the "
            "plain network instead: lightning_resode.from_adjoint(model) (same weights and state_dict keys)"
        )

    @torch.compiler.disable
    def _training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The memory-free forward, run eagerly under ``torch.compile`` (one graph break per stage: its nodes call
        autograd from their backward, which a compiled graph cannot hold)."""
        if _functorch_transforming():
            warnings.warn(
                f"stage {self.display_name}: under a torch.func transform (grad, vjp, vmap, …) the stage runs plain "
                "autograd: exact gradients, but every activation is kept. The memory-free backward needs "
                "torch.autograd (loss.backward(), torch.autograd.grad), which torch.func.functional_call supports",
                UserWarning,
                stacklevel=2,
            )
            return self.plain_forward(x)
        gradient = planned_gradient(self)
        if gradient == "backprop":
            return self.plain_forward(x)
        binding = ParameterBinding.capture(self._blocks)
        if not binding.trainable and not x.requires_grad:
            return self.plain_forward(x)
        self._reject_sync_batchnorm()
        self._reject_input_dtype(x)
        tape = Tape(self, binding, x)
        if gradient == "checkpoint" or self.exact_head == len(self):
            return run_checkpoint(tape, x)
        return run_chain(tape, x)


def _first_floating_parameter(module: nn.Module) -> torch.Tensor | None:
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def _traced(x: torch.Tensor) -> bool:
    """FX symbolic tracing or TorchScript tracing: they record the plain forward's ops."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()


def _functorch_transforming() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(getattr(module, "num_batches_tracked", None), torch.Tensor)
