"""What a recomputed block must see again: BatchNorm batch statistics, random draws, autocast state.

A block is re-evaluated in the backward pass at a *reconstructed* input. For the recomputation to be the
same function as the forward, everything the forward read implicitly must be replayed:

- BatchNorm in training mode normalises with statistics of its current input. We record the forward's
  batch statistics per evaluation and replay them, and never touch running statistics again (the
  forward already updated them once). Interception happens at ``F.batch_norm`` through a
  ``TorchFunctionMode``, so ``nn.BatchNorm*`` and timm's ``BatchNormAct2d`` are both covered.
- Dropout / drop-path draw from the global generators; we keep the generator state before each
  evaluation that consumed randomness and restore it around recomputation.
- Autocast is thread-local state that the autograd engine does not carry into ``backward``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import lean

EvalKey = Hashable

_BN_ARG_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _bind_batch_norm_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(_BN_DEFAULTS)
    bound.update(zip(_BN_ARG_NAMES, args))
    bound.update(kwargs)
    return bound


class BatchNormReplay(TorchFunctionMode):
    """Records or replays the batch statistics of every training-mode ``F.batch_norm`` call.

    Modes:
      ``forward``     normal BatchNorm, nothing kept (forward of exactly recomputed blocks).
      ``record``      normal BatchNorm (running stats updated once) + keep (mean, var) per call.
      ``frozen``      normalise with the recorded statistics as constants (reconstruction steps).
      ``substitute``  values equal the recorded statistics, gradient flows through the batch
                      statistics of the current input, as training-mode BatchNorm's does (VJP steps).
      ``exact``       batch statistics of the current input, running statistics untouched
                      (exact recomputation from a stored input: checkpointing).
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[EvalKey, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._mode = "exact"
        self._key: EvalKey | None = None
        self._cursor = 0
        self._last_sum: weakref.ref[torch.Tensor] | None = None
        self._last_conv: lean.ConvSource | None = None
        self._lean_head = False
        self._compact: lean.CompactInput | None = None
        self._private_outputs: list[tuple[nn.Module, nn.Module]] = []
        self._step_gradient: lean.StepGradient | None = None
        self._residual: lean.ResidualGradient | None = None
        #: the stage's ``lean_graphs`` parts (``stage.LEAN_PARTS``): the others keep autograd's own convolution and
        #: BatchNorm nodes in recomputations (faster; only the forms reading a 16-bit stored input and the ReLU's
        #: mask stay)
        self.lean_parts: frozenset[str] = frozenset(("head", "head_recompute", "steps"))

    @contextlib.contextmanager
    def evaluation(self, mode: str, key: EvalKey | None = None) -> Iterator[None]:
        """Route the BatchNorm calls of one block evaluation; ``key`` names the forward evaluation."""
        previous = (self._mode, self._key, self._cursor, self._last_sum, self._last_conv)
        self._mode, self._key, self._cursor, self._last_sum, self._last_conv = mode, key, 0, None, None
        if mode == "record":
            self.records[key] = []
        try:
            with self:
                yield
            if mode in ("frozen", "substitute") and self._cursor != len(self.records.get(key, ())):
                raise RuntimeError(
                    f"block evaluation {key!r} called training-mode BatchNorm {self._cursor} times in "
                    f"recomputation but {len(self.records.get(key, ()))} times in the forward; a block must "
                    "run the same layers every time it is called"
                )
        finally:
            self._mode, self._key, self._cursor, self._last_sum, self._last_conv = previous

    @contextlib.contextmanager
    def lean_head(self) -> Iterator[None]:
        """Exact recomputations in this context build a head's leaner graph (``lean``): 1×1 convolutions with
        product backwards, and no convolution output kept that only a BatchNorm reads (that BatchNorm saves the
        convolution's input and recomputes the output in its backward: one more convolution per head)."""
        previous, self._lean_head = self._lean_head, True
        try:
            yield
        finally:
            self._lean_head = previous

    @contextlib.contextmanager
    def compact_input(self, compact: lean.CompactInput | None) -> Iterator[None]:
        """While recomputing a step at ``compact.leaf``: its 1×1 convolutions and residual sums read the 16-bit
        copy, and any other read of the leaf gives it its values first."""
        previous, self._compact = self._compact, compact
        try:
            yield
        finally:
            self._compact = previous

    @contextlib.contextmanager
    def private_outputs(self, blocks: list[nn.Module]) -> Iterator[None]:
        """While recomputing a step of ``blocks``: the (convolution, BatchNorm) pairs of those blocks whose code
        reads the convolution's output only through the BatchNorm (``lean.private_conv_outputs``), so that the
        BatchNorm may overwrite it."""
        previous, self._private_outputs = self._private_outputs, [pair for block in blocks for pair in lean.private_conv_outputs(block)]
        try:
            yield
        finally:
            self._private_outputs = previous

    @contextlib.contextmanager
    def step_gradient(self, gradient: lean.StepGradient | None, leaf: torch.Tensor | None = None, block: nn.Module | None = None) -> Iterator[None]:
        """While recomputing a step whose VJP starts from ``gradient``: a ReLU of the step's output may write its
        gradient into that one (``lean.ReluKeepingMask``), where ``gradient.private`` says no one else holds it;
        and where the step is one ``block`` at ``leaf`` with a registered residual entry, the residual sum hands
        its gradient for the leaf to that convolution (``lean.ResidualGradient``)."""
        entry = lean.residual_entry(block) if block is not None and leaf is not None and "steps" in self.lean_parts else None
        residual = lean.ResidualGradient(leaf, entry.weight, gradient) if entry is not None else None
        previous = self._step_gradient, self._residual
        self._step_gradient, self._residual = gradient, residual
        try:
            yield
        finally:
            self._step_gradient, self._residual = previous

    def _next_record(self) -> tuple[torch.Tensor, torch.Tensor]:
        recorded = self.records.get(self._key, [])
        if self._cursor >= len(recorded):
            raise RuntimeError(
                f"block evaluation {self._key!r} called training-mode BatchNorm more often in "
                f"recomputation than in the forward ({len(recorded)} calls recorded)"
            )
        stats = recorded[self._cursor]
        self._cursor += 1
        return stats

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch protocol)
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            if self._mode == "substitute" or (self._mode == "exact" and self._lean_head):
                return self._lean_call(func, args, kwargs)
            return func(*args, **kwargs)
        a = _bind_batch_norm_args(args, kwargs)
        x = a["input"]
        if self._compact is not None and not self._compact.materialized and self._compact.read_by(args, kwargs):
            self._compact.materialize()
        if not a["training"]:
            return func(*args, **kwargs)
        if self._mode == "forward":
            return func(*args, **kwargs)
        if self._mode == "record":
            out, mean, var = _batch_norm_keeping_statistics(func, a)
            self.records[self._key].append((mean, var))
            return out
        if self._mode == "exact":
            source, self._last_conv = self._last_conv, None
            if source is not None and source.produced(x):
                if lean.expanding_pointwise(source, x) and torch.is_grad_enabled():
                    with torch.no_grad():
                        mean, var = _batch_statistics(x)
                    return self._batch_norm_of_expansion(source, x, a, mean, var)
                if _cheap_to_recompute(source) or "head_recompute" in self.lean_parts:
                    return _BatchStatisticsBatchNormOfConv.apply(x, a["weight"], a["bias"], a["eps"], source, *source.tensors)
            if _lean_backward_applies(x):
                # F.batch_norm(training=True) without running statistics, whose CPU backward would allocate a
                # temporary the size of x on top of the recomputation's peak
                return _BatchStatisticsBatchNorm.apply(x, a["weight"], a["bias"], a["eps"])
            return func(x, None, None, a["weight"], a["bias"], True, a["momentum"], a["eps"])
        mean_fwd, var_fwd = self._next_record()
        if self._mode == "frozen":
            return func(x, mean_fwd, var_fwd, a["weight"], a["bias"], False, 0.0, a["eps"])
        source, self._last_conv = self._last_conv, None
        if source is not None and source.produced(x) and lean.expanding_pointwise(source, x) and torch.is_grad_enabled():
            return self._batch_norm_of_expansion(source, x, a, mean_fwd, var_fwd)
        return _batch_norm_with_substituted_stats(x, mean_fwd, var_fwd, a["weight"], a["bias"], a["eps"])

    def _batch_norm_of_expansion(self, source: lean.ConvSource, x: torch.Tensor, a: dict[str, Any], mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Training-mode BatchNorm with statistics (mean, var) of x, the output of an expanding 1×1 convolution, as
        one node with it (``lean.BatchNormOfExpansion``); in x's own buffer where only this BatchNorm reads x."""
        z, conv_weight, *conv_bias = source.tensors
        in_place = any(conv_weight is conv.weight and a["running_mean"] is bn.running_mean for conv, bn in self._private_outputs)
        return lean.BatchNormOfExpansion.apply(
            x.detach(), z, conv_weight, conv_bias[0] if conv_bias else None, a["weight"], a["bias"], mean, var, a["eps"], in_place
        )

    def _lean_call(self, func, args: tuple, kwargs: dict) -> Any:  # noqa: ANN001
        """A call of a step's (``substitute``) or a head's (``exact`` under ``lean_head``) graph, in ``lean`` form."""
        compact = self._compact
        lean_graphs = ("steps" if self._mode == "substitute" else "head") in self.lean_parts
        pointwise = lean.pointwise_conv_arguments(args, kwargs) if func is F.conv2d else None
        residual = self._residual if self._mode == "substitute" else None
        if compact is not None and not compact.materialized and func not in _METADATA and compact.read_by(args, kwargs):
            sum_of_leaf = _residual_sum_with(compact.leaf, compact.compact, residual, func, args, kwargs)
            if sum_of_leaf is not None:
                self._last_sum = weakref.ref(sum_of_leaf)
                return sum_of_leaf
            if pointwise is None or pointwise[0] is not compact.leaf:
                compact.materialize()
        elif residual is not None and residual.taken_by_conv and func in lean.SUMS:
            sum_of_leaf = _residual_sum_with(residual.leaf, None, residual, func, args, kwargs)
            if sum_of_leaf is not None:
                self._last_sum = weakref.ref(sum_of_leaf)
                return sum_of_leaf
        if func is F.conv2d:
            reads_compact = pointwise is not None and compact is not None and not compact.materialized and pointwise[0] is compact.leaf
            if pointwise is None or not (lean_graphs or reads_compact):
                out = func(*args, **kwargs)
            else:
                takes_residual = (
                    residual is not None and not residual.taken_by_conv and pointwise[0] is residual.leaf
                    and pointwise[1] is residual.entry_weight
                )
                if takes_residual:
                    residual.taken_by_conv = True
                out = lean.PointwiseConv.apply(*pointwise, compact.compact if reads_compact else None, residual if takes_residual else None)
            if lean_graphs:
                self._last_conv = lean.ConvSource.of(args, kwargs, out)
            return out
        if self._mode == "substitute" and func in lean.RELUS and args and self._last_sum is not None and args[0] is self._last_sum():
            # in a head the output is the VJP's root, alive until the graph is built anyway: the mask would add
            x = args[0]
            if x.requires_grad and x.is_floating_point() and torch.is_grad_enabled():
                return lean.ReluKeepingMask.apply(x, lean.relu_is_in_place(func, args, kwargs), self._step_gradient)
        out = func(*args, **kwargs)
        if func in lean.SUMS and isinstance(out, torch.Tensor):
            self._last_sum = weakref.ref(out)
        return out


#: reads of a tensor that save nothing of its values
_METADATA = frozenset({
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.is_floating_point, torch.Tensor.is_contiguous,
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.ndim.__get__,
    torch.Tensor.requires_grad.__get__, torch.Tensor.layout.__get__, torch.Tensor.is_cuda.__get__,
})


_IN_PLACE_SUMS = frozenset({torch.Tensor.add_, torch.Tensor.__iadd__})


def _residual_sum_with(
    leaf: torch.Tensor, compact: torch.Tensor | None, residual: lean.ResidualGradient | None, func: Any, args: tuple, kwargs: dict
) -> torch.Tensor | None:
    """``y + leaf`` (or ``y += leaf``) of a step's leaf (its values in ``compact`` where given) and another tensor of
    its shape, as ``lean.ResidualAdd``, else None."""
    if func not in lean.SUMS or kwargs or len(args) != 2:
        return None
    first, second = args
    if first is leaf and func not in _IN_PLACE_SUMS:
        first, second = second, first
    if second is not leaf or not isinstance(first, torch.Tensor) or first is leaf:
        return None
    if first.shape != leaf.shape or first.dtype != leaf.dtype:
        return None
    handing = residual if residual is not None and residual.taken_by_conv and residual.leaf is leaf else None
    return lean.ResidualAdd.apply(first, leaf, compact, func in _IN_PLACE_SUMS, handing)


def _batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of x, as training-mode BatchNorm computes them. On the CPU
    BatchNorm's own statistics kernel: ``torch.var_mean`` over (N, H, W) took 3× its time there."""
    if x.device.type == "cpu":
        return torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)
    var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
    return mean, var


def _batch_norm_keeping_statistics(func, a: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's BatchNorm, unchanged, plus its batch (mean, biased var) at no extra pass on CPU."""
    x, eps = a["input"], a["eps"]
    if x.is_cuda:
        # keep cuDNN's kernel for the output (bitwise the plain forward); one fused reduction for the stats
        out = func(x, a["running_mean"], a["running_var"], a["weight"], a["bias"], True, a["momentum"], eps)
        with torch.no_grad():
            mean, invstd = torch.batch_norm_stats(x, eps)
    else:  # what F.batch_norm runs on CPU, with its saved statistics returned
        out, mean, invstd = torch.native_batch_norm(
            x, a["weight"], a["bias"], a["running_mean"], a["running_var"], True, a["momentum"], eps
        )
    return out, mean, invstd.pow(-2) - eps


def _batch_norm_with_substituted_stats(
    x: torch.Tensor,
    mean_fwd: torch.Tensor,
    var_fwd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Training-mode BatchNorm at x whose statistics are the forward's (values and gradient formula)."""
    invstd_fwd = torch.rsqrt(var_fwd + eps)
    return _ReplayedBatchNorm.apply(x, weight, bias, mean_fwd, var_fwd, invstd_fwd, eps)


class _ReplayedBatchNorm(torch.autograd.Function):
    """Normalise with the forward's statistics; differentiate as training-mode BatchNorm with those statistics.

    Forward: the fused eval-mode kernel fed the recorded (mean, var). Backward: the fused training-mode
    backward fed the recorded (mean, invstd) as its saved batch statistics, so the gradient includes the
    terms through the batch statistics. When the reconstruction is exact this is exactly what autograd
    computes for ``F.batch_norm(training=True)``, at the cost of plain BatchNorm (two fused kernels).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean_fwd, var_fwd, invstd_fwd, eps):  # noqa: ANN001, ANN205
        out = torch.native_batch_norm(x, weight, bias, mean_fwd, var_fwd, False, 0.0, eps)[0]
        ctx.save_for_backward(x, weight, mean_fwd, invstd_fwd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight, mean_fwd, invstd_fwd = ctx.saved_tensors
        return (*_batch_norm_backward(ctx, grad_out, x, weight, mean_fwd, invstd_fwd), None, None, None, None)


def _batch_norm_backward(ctx, grad_out, x, weight, mean, invstd):  # noqa: ANN001, ANN202
    """Training-mode BatchNorm's (grad_x, grad_weight, grad_bias) at x with batch statistics (mean, invstd)."""
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    if _lean_backward_applies(x) and grad_out.is_contiguous() and mask[0]:
        grad_x, grad_w, grad_b = lean.batch_norm_backward(grad_out, x, weight, mean, invstd)
        return grad_x, grad_w if mask[1] else None, grad_b if mask[2] else None
    grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
        grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, mask
    )
    return grad_x, grad_w, grad_b


class _BatchStatisticsBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm on the batch's own statistics (running statistics untouched), lean backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # noqa: ANN001, ANN205
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight, mean, invstd = ctx.saved_tensors
        return (*_batch_norm_backward(ctx, grad_out, x, weight, mean, invstd), None)


class _BatchStatisticsBatchNormOfConv(torch.autograd.Function):
    """``_BatchStatisticsBatchNorm`` of a convolution's output that saves the convolution's input, not its own.

    The convolution's input and weight are passed (and saved) only to recompute the BatchNorm input in the
    backward; their gradients come from the convolution's own node, so this node returns none for them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, source, *conv_tensors):  # noqa: ANN001, ANN205
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(weight, mean, invstd, *conv_tensors)
        ctx.eps, ctx.source = eps, source
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        weight, mean, invstd, *conv_tensors = ctx.saved_tensors
        x = ctx.source.recompute(tuple(conv_tensors))
        del conv_tensors
        grad_x, grad_w, grad_b = _batch_norm_backward(ctx, grad_out, x, weight, mean, invstd)
        return (grad_x, grad_w, grad_b, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


def _cheap_to_recompute(source: lean.ConvSource) -> bool:
    """Whether a BatchNorm recomputes its input, this convolution's output, in its backward whatever the stage's
    ``head_recompute`` part: a 1×1 convolution (one product per position; a k×k one costs k² times that)."""
    weight = source.tensors[1]
    return weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1)


def _lean_backward_applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous() and x.dim() >= 2


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """Keep channels_last gradients channels_last: the fused kernel reads both tensors in one layout."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@contextlib.contextmanager
def batch_counters_preserved(modules: list[nn.Module]) -> Iterator[None]:
    """BatchNorm modules bump ``num_batches_tracked`` in Python before ``F.batch_norm``; undo the replays' bumps."""
    counters = [m.num_batches_tracked for m in modules if isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor)]
    saved = [c.clone() for c in counters]
    try:
        yield
    finally:
        for counter, value in zip(counters, saved):
            counter.copy_(value)


@dataclass
class RngSnapshot:
    """Generator state before one block evaluation; only kept for evaluations that drew random numbers."""

    cpu: torch.Tensor
    device: torch.device | None
    device_state: torch.Tensor | None

    @staticmethod
    def capture(device: torch.device) -> "RngSnapshot":
        device_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return RngSnapshot(torch.get_rng_state(), device if device.type == "cuda" else None, device_state)

    def same_as(self, other: "RngSnapshot") -> bool:
        if not torch.equal(self.cpu, other.cpu):
            return False
        if self.device_state is None or other.device_state is None:
            return True
        return torch.equal(self.device_state, other.device_state)

    def tensors(self) -> list[torch.Tensor]:
        return [self.cpu] + ([self.device_state] if self.device_state is not None else [])

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.device_state is not None:
                torch.cuda.set_rng_state(self.device_state, self.device)
            yield


@dataclass(frozen=True)
class AutocastState:
    """The forward's autocast setting, to re-enter in ``backward`` (which runs outside it)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @staticmethod
    def capture(device_type: str) -> "AutocastState":
        return AutocastState(
            device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        )

    def replayed(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=True)
