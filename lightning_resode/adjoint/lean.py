"""Leaner autograd graphs for the engine's recomputations: the same gradients, fewer or smaller saved tensors.

Each backward node of an adjoint stage rebuilds one step's graph (or the head's) and runs its VJP at once; the
graph's saved tensors plus the VJP's temporaries are the backward's working set, and in a bottleneck they are
dominated by 4×-channel tensors. The forms here remove such tensors without changing any gradient formula:

- ``ReluKeepingMask``: the ReLU after a residual sum saves a 1-byte mask of its positive inputs. Autograd's
  ReLU saves its output, which is the block output: nothing else in the step's graph needs it.
- ``PointwiseConv``: a 1×1 convolution's backward as two batched matrix products. On the CPU, oneDNN's backward
  copies the output gradient into another layout (for the input and again for the weight gradient); at a
  bottleneck's 4× expansion that copy was the largest temporary of the VJP. It may also save a 16-bit copy of
  its input that upcasts exactly to it (a stored block input), not the float32 input.
- ``ConvSource``: what recomputes a convolution's output, so that a BatchNorm reading only that output can
  save the convolution's input instead (``replay``'s BatchNorm-of-convolution nodes). Used in a stage head's
  VJP, where it costs one convolution per stage.

``replay.BatchNormReplay`` routes a recomputation's calls here: it sees every torch function of it.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

SUMS = frozenset({torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__})
IN_PLACE_RELUS = frozenset({torch.relu_, torch.Tensor.relu_, F.relu_})
RELUS = frozenset({F.relu, torch.relu, torch.Tensor.relu}) | IN_PLACE_RELUS
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def relu_is_in_place(func: Any, args: tuple, kwargs: dict) -> bool:
    return func in IN_PLACE_RELUS or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))


class ReluKeepingMask(torch.autograd.Function):
    """ReLU whose backward reads a 1-byte mask of its nonzero outputs instead of the outputs.

    ReLU's own backward passes the gradient where its output is not ``<= 0`` (a NaN output passes it too); the
    mask is ``output != 0`` as bytes, which ``threshold_backward`` reads the same way. Both kernels are the fast
    ones: comparisons into ``bool`` and ``where`` over a ``bool`` mask run several times slower on the CPU.
    """

    @staticmethod
    def forward(ctx, x, inplace):  # noqa: ANN001, ANN205
        if inplace:
            ctx.mark_dirty(x)
            out = x.relu_()
        else:
            out = torch.relu(x)
        ctx.save_for_backward(out.bool().view(torch.uint8))
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        (mask,) = ctx.saved_tensors
        grad_x = torch.empty_like(grad_out)
        # a few images at a time: the kernel converts the byte mask to the gradient's dtype in a temporary
        for rows in _batch_chunks(len(grad_out)):
            torch.ops.aten.threshold_backward.grad_input(grad_out[rows], mask[rows], 0, grad_input=grad_x[rows])
        return grad_x, None


def _batch_chunks(n: int, parts: int = 8) -> list[slice]:
    """At most ``parts`` slices of a batch of ``n``: a mixed-precision temporary is then an eighth of a tensor."""
    size = max(1, -(-n // parts))
    return [slice(i, i + size) for i in range(0, n, size)]


def pointwise_conv_arguments(args: tuple, kwargs: dict, graph: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(input, weight, bias) of a ``F.conv2d`` call that ``PointwiseConv`` computes the same, else None (``graph``:
    only where a graph is being built)."""
    bound = dict(zip(_CONV_ARGS, args))
    bound.update(kwargs)
    x, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu"):
        return None
    if not (x.is_contiguous() and weight.shape[2:] == (1, 1) and x.dtype == weight.dtype and (torch.is_grad_enabled() or not graph)):
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    stride, padding, dilation, groups = (bound.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)))
    if stride not in (1, (1, 1), [1, 1]) or dilation not in (1, (1, 1), [1, 1]) or padding not in (0, (0, 0), [0, 0], "valid"):
        return None
    return (x, weight, bias) if groups == 1 else None


def _pointwise_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1×1 convolution of a contiguous NCHW tensor as one batched matrix product: a head's recomputation of a
    BatchNorm input (measured on resnet50's step: 1.43× backprop's time instead of 1.49× with oneDNN's forward)."""
    n, c, h, w = x.shape
    out = torch.bmm(weight.view(weight.shape[0], c).expand(n, -1, -1), x.view(n, c, h * w)).view(n, -1, h, w)
    return out.add_(bias.view(1, -1, 1, 1)) if bias is not None else out


class PointwiseConv(torch.autograd.Function):
    """A 1×1 convolution (stride 1, no padding, one group) whose backward is two batched matrix products.

    ``compact``, when given, is a lower-precision tensor that converts exactly to ``x``: it is saved instead of
    ``x`` and converted back a few images at a time for the weight gradient; the forward reads it too, so ``x``
    itself need not hold its values (see ``CompactInput``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, compact):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x if compact is None else compact, weight)
        ctx.has_bias, ctx.dtype = bias is not None, x.dtype
        return F.conv2d(x if compact is None else compact.to(x.dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        saved, weight = ctx.saved_tensors
        n, c, h, w = saved.shape
        out_channels = weight.shape[0]
        grad_out = grad_out.contiguous().view(n, out_channels, h * w)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # bmm, not matmul: matmul folds the batch of a broadcast product into a copy
            grad_x = torch.bmm(weight.view(out_channels, c).t().expand(n, c, out_channels), grad_out).view(n, c, h, w)
        if ctx.needs_input_grad[1]:
            if saved.dtype == ctx.dtype:
                grad_weight = torch.bmm(grad_out, saved.view(n, c, h * w).transpose(1, 2)).sum(0)
            else:
                grad_weight = weight.new_zeros(out_channels, c)
                for rows in _batch_chunks(n):  # the upcast copy is at most an eighth of the input
                    x = saved[rows].to(ctx.dtype).view(-1, c, h * w)
                    grad_weight += torch.bmm(grad_out[rows], x.transpose(1, 2)).sum(0)
            grad_weight = grad_weight.view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2))
        return grad_x, grad_weight, grad_bias, None


class ResidualAdd(torch.autograd.Function):
    """``y + x`` (in place into ``y`` when asked) where x's values are read from ``compact`` (see ``CompactInput``)."""

    @staticmethod
    def forward(ctx, y, x, compact, inplace):  # noqa: ANN001, ANN205
        if inplace:
            ctx.mark_dirty(y)
            out = y
        else:
            out = y.clone()
        # a few images at a time: a mixed-precision add would upcast all of ``compact`` into a temporary first
        for rows in _batch_chunks(len(out)):
            out[rows] += compact[rows]
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        return grad_out, grad_out, None, None


class CompactInput:
    """A step's input leaf whose float32 values live only in a 16-bit copy that converts exactly to them.

    A stored 16-bit block input is upcast for the VJP; the upcast copy is the largest tensor of a step's graph
    and in a bottleneck only two ops read it: the first 1×1 convolution (``PointwiseConv`` reads and saves the
    16-bit copy) and the residual sum (``ResidualAdd``). So the leaf is created without values (its storage
    released) and is given them (``materialize``) only if any other op reads it, before that op runs.
    """

    def __init__(self, compact: torch.Tensor, dtype: torch.dtype) -> None:
        self.compact: torch.Tensor | None = compact
        self.leaf = torch.empty_like(compact, dtype=dtype)
        self.leaf.untyped_storage().resize_(0)
        self._storage = self.leaf.untyped_storage()._cdata
        self.materialized = False

    def read_by(self, args: tuple, kwargs: dict) -> bool:
        """Whether an op's arguments hold the leaf or a view of it, also inside lists, tuples and dicts."""
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata == self._storage:
                return True
        return False

    def escaped(self, references: int) -> bool:
        """Whether Python holds the leaf in more places than the ``references`` the engine knows of: a forward
        hook or a block that keeps its input would later read a tensor without values."""
        return sys.getrefcount(self.leaf) - 1 > references

    def materialize(self) -> None:
        """Give the leaf its values; the 16-bit copy is then no longer read (and freed unless a node saved it)."""
        if not self.materialized:
            self.materialized = True
            self.leaf.untyped_storage().resize_(self.leaf.numel() * self.leaf.element_size())
            with torch.no_grad():
                self.leaf.copy_(self.compact)
            self.compact = None


@dataclass
class ConvSource:
    """A ``F.conv2d`` call whose output may be recomputed: its output (weakly) and what recomputes it."""

    output: weakref.ref
    version: int  # the output's version when made: an in-place op since then changed what a reader sees
    tensors: tuple[torch.Tensor, ...]  # input, weight[, bias]
    options: tuple[Any, Any, Any, Any]  # stride, padding, dilation, groups

    @staticmethod
    def of(args: tuple, kwargs: dict, out: Any) -> "ConvSource | None":
        bound = dict(zip(_CONV_ARGS, args))
        bound.update(kwargs)
        if not isinstance(out, torch.Tensor) or not isinstance(bound.get("input"), torch.Tensor):
            return None
        bias = bound.get("bias")
        tensors = (bound["input"], bound["weight"]) + ((bias,) if bias is not None else ())
        options = (bound.get("stride", 1), bound.get("padding", 0), bound.get("dilation", 1), bound.get("groups", 1))
        return ConvSource(weakref.ref(out), out._version, tensors, options)

    def produced(self, x: torch.Tensor) -> bool:
        """Whether x is this convolution's output as it made it (no in-place op since, no autocast)."""
        return self.output() is x and x._version == self.version and not torch.is_autocast_enabled(x.device.type)

    def recompute(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inp, weight, *bias = tensors
        with torch.no_grad():
            if pointwise_conv_arguments((inp, weight, None, *self.options), {}, graph=False) is not None:
                return _pointwise_product(inp, weight, bias[0] if bias else None)
            return F.conv2d(inp, weight, bias[0] if bias else None, *self.options)
