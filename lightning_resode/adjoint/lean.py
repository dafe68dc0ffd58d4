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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_backward_hooks, _global_backward_pre_hooks, _global_forward_hooks, _global_forward_pre_hooks
from torch.utils._pytree import tree_flatten

SUMS = frozenset({torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__})
IN_PLACE_RELUS = frozenset({torch.relu_, torch.Tensor.relu_, F.relu_})
RELUS = frozenset({F.relu, torch.relu, torch.Tensor.relu}) | IN_PLACE_RELUS
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def relu_is_in_place(func: Any, args: tuple, kwargs: dict) -> bool:
    return func in IN_PLACE_RELUS or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))


class StepGradient:
    """The output gradient of one step's VJP, which the VJP's root hands to autograd (and then holds no more).

    ``private``: nothing outside the engine can hold this tensor (it is the gradient the step above computed,
    not the stage's incoming one, which a user's hook may keep), so the op that receives it first may write its
    own gradient into it (``ReluKeepingMask``) instead of allocating a state-sized tensor beside it.
    """

    def __init__(self, grad: torch.Tensor | None, private: bool) -> None:
        self._grad, self.private = grad, private
        self._handed: weakref.ref[torch.Tensor] | None = None
        self._version = -1

    def hand_over(self) -> torch.Tensor | None:
        grad, self._grad = self._grad, None
        if grad is not None:
            self._handed, self._version = weakref.ref(grad), grad._version
        return grad

    def handed_back(self, t: torch.Tensor | None) -> bool:
        """Whether ``t`` is the very tensor handed over (a VJP that passed its gradient through)."""
        return t is not None and self._handed is not None and self._handed() is t

    def handed_back_unchanged(self, t: torch.Tensor | None) -> bool:
        """Whether ``t`` is the tensor handed over, unchanged: autograd adds into a gradient in place only where
        it holds the only reference, so a changed one is autograd's own from then on."""
        return self.handed_back(t) and t._version == self._version

    def may_overwrite(self, t: torch.Tensor) -> bool:
        return self.private and self.handed_back(t)


class ReluKeepingMask(torch.autograd.Function):
    """ReLU whose backward reads a 1-byte mask of its nonzero outputs instead of the outputs.

    ReLU's own backward passes the gradient where its output is not ``<= 0`` (a NaN output passes it too); the
    mask is ``output != 0`` as bytes, which ``threshold_backward`` reads the same way. Both kernels are the fast
    ones: comparisons into ``bool`` and ``where`` over a ``bool`` mask run several times slower on the CPU.
    Where its output is the step's output and the gradient it receives is a ``StepGradient`` that it may
    overwrite, the backward writes into that gradient (one state-sized tensor less in the VJP's working set).
    """

    @staticmethod
    def forward(ctx, x, inplace, gradient):  # noqa: ANN001, ANN205
        if inplace:
            ctx.mark_dirty(x)
            out = x.relu_()
        else:
            out = torch.relu(x)
        ctx.save_for_backward(out.bool().view(torch.uint8))
        ctx.gradient = gradient
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        (mask,) = ctx.saved_tensors
        overwrite = ctx.gradient is not None and ctx.gradient.may_overwrite(grad_out) and grad_out.is_contiguous()
        grad_x = grad_out if overwrite else torch.empty_like(grad_out)
        # a few images at a time: the kernel converts the byte mask to the gradient's dtype in a temporary
        for rows in _batch_chunks(len(grad_out)):
            torch.ops.aten.threshold_backward.grad_input(grad_out[rows], mask[rows], 0, grad_input=grad_x[rows])
        return grad_x, None, None


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
    """A 1×1 convolution of a contiguous NCHW tensor as one batched matrix product (a head's recomputation of a
    BatchNorm input measured 1.43× backprop's step time instead of 1.49× with oneDNN's convolution, which also
    allocates an output-sized buffer besides its output at a bottleneck's 4× expansion)."""
    n, c, h, w = x.shape
    out_channels = weight.shape[0]
    out = x.new_empty((n, out_channels, h, w))  # written through a view: the result is not itself a view
    _per_image_product(weight.view(out_channels, c), x.view(n, c, h * w), out=out.view(n, out_channels, h * w))
    return out.add_(bias.view(1, -1, 1, 1)) if bias is not None else out


#: positions per image up to which ``_per_image_product`` runs one matrix product over all images (CPU)
_FEW_POSITIONS = 64


def _per_image_product(matrix: torch.Tensor, batch: torch.Tensor, out: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
    """``matrix @ batch[i]`` for each image i of an (n, q, m) batch: (n, p, m), into ``out`` when given (added to
    what ``out`` holds with ``add``).

    A batched product with the matrix broadcast over the images runs one thin product per image; with few positions
    per image (m ≤ 64: resnet50's layer3–4 at 128², layer4 at 224²) those are slow on CPU (2× at layer4), and one
    product over all images' positions, through a transposed copy of the (then small) batch, is faster."""
    n, q, m = batch.shape
    if out is None:
        out = batch.new_empty((n, matrix.shape[0], m))
    if batch.is_cuda or m > _FEW_POSITIONS:
        if add:
            return out.baddbmm_(matrix.expand(n, -1, -1), batch)
        return torch.bmm(matrix.expand(n, -1, -1), batch, out=out)
    product = matrix @ batch.transpose(0, 1).reshape(q, n * m)
    if add:
        return out.add_(product.view(-1, n, m).transpose(0, 1))
    return out.copy_(product.view(-1, n, m).transpose(0, 1))


def _sum_of_products(a: torch.Tensor, b: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """Σₙ aₙ bₙᵀ of (n, p, m) and (n, q, m) batches, added to ``into`` when given. On CPU one accumulating
    product per image: a batched product writes all n (p × q) terms before summing them, and where p·q is
    large beside m (resnet50's layer4 at 128²: 8 × 2048 × 512 terms from 16 positions) that costs 6× the
    products themselves. On GPU one batched product, not n launches."""
    if a.is_cuda:
        total = torch.bmm(a, b.transpose(1, 2)).sum(0)
        return total if into is None else into.add_(total)
    out = a.new_zeros(a.shape[1], b.shape[1]) if into is None else into
    for a_n, b_n in zip(a, b):
        out.addmm_(a_n, b_n.t())
    return out


class PointwiseConv(torch.autograd.Function):
    """A 1×1 convolution (stride 1, no padding, one group) whose backward is two batched matrix products.

    ``compact``, when given, is a lower-precision tensor that converts exactly to ``x``: it is saved instead of
    ``x`` and converted back a few images at a time for the weight gradient; the forward reads it too, so ``x``
    itself need not hold its values (see ``CompactInput``). ``residual``, when given, may hold the residual
    sum's gradient for ``x`` at backward time: the input gradient is then added into it (``ResidualGradient``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, compact, residual=None):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x if compact is None else compact, weight)
        ctx.has_bias, ctx.dtype, ctx.residual = bias is not None, x.dtype, residual
        if compact is None:
            return _pointwise_product(x, weight, bias)
        # a few images at a time: the upcast copy of the 16-bit input is an eighth of it (oneDNN's convolution
        # would take the whole upcast copy, and allocates an output-sized buffer of its own besides the output)
        n, c, h, w = compact.shape
        out = x.new_empty((n, weight.shape[0], h, w))
        for rows in _batch_chunks(n):
            out[rows] = _pointwise_product(compact[rows].to(x.dtype), weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        saved, weight = ctx.saved_tensors
        n, c, h, w = saved.shape
        out_channels = weight.shape[0]
        grad_out = grad_out.contiguous().view(n, out_channels, h * w)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            residual = ctx.residual.take() if ctx.residual is not None else None
            if residual is not None:  # the residual sum's gradient, the engine's own: this one is added into it
                grad_x = _per_image_product(weight.view(out_channels, c).t(), grad_out, out=residual.view(n, c, h * w), add=True).view(n, c, h, w)
            else:
                grad_x = _per_image_product(weight.view(out_channels, c).t(), grad_out).view(n, c, h, w)
        if ctx.needs_input_grad[1]:
            if saved.dtype == ctx.dtype:
                grad_weight = _sum_of_products(grad_out, saved.view(n, c, h * w))
            else:
                grad_weight = weight.new_zeros(out_channels, c)
                for rows in _batch_chunks(n):  # the upcast copy is at most an eighth of the input
                    x = saved[rows].to(ctx.dtype).view(-1, c, h * w)
                    _sum_of_products(grad_out[rows], x, into=grad_weight)
            grad_weight = grad_weight.view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2))
        return grad_x, grad_weight, grad_bias, None, None


class ResidualGradient:
    """Where a step's residual sum ``y + x`` hands its gradient for x to the 1×1 convolution that reads x first
    (``PointwiseConv``), which adds its own gradient for x into it: autograd would add the two into a third
    state-sized tensor, the largest of a bottleneck's VJP once it is done with the block output's gradient.

    Only for a block whose adapter declares that convolution (``register_residual_entry``: it and the sum are
    the only readers of x, and the sum's gradient for the branch is read before the convolution's backward runs),
    where no hook could hold that gradient, and only if the gradient is the engine's own (``StepGradient``).
    """

    def __init__(self, leaf: torch.Tensor, entry_weight: torch.Tensor, gradient: StepGradient | None) -> None:
        self.leaf, self.entry_weight, self.gradient = leaf, entry_weight, gradient
        self.taken_by_conv = False
        self._grad: torch.Tensor | None = None

    def hand(self, grad: torch.Tensor) -> bool:
        """Keep the sum's gradient for the convolution, if it may be written into; else the sum returns it."""
        if not self.taken_by_conv or not grad.is_contiguous():
            return False
        if self.gradient is None or (self.gradient.handed_back(grad) and not self.gradient.private):
            return False  # the stage's incoming gradient (no ReLU after the sum made a new one): not ours
        self._grad = grad
        return True

    def take(self) -> torch.Tensor | None:
        grad, self._grad = self._grad, None
        return grad


class ResidualAdd(torch.autograd.Function):
    """``y + x`` (in place into ``y`` when asked); x's values read from ``compact`` where given (``CompactInput``),
    and x's gradient handed to the convolution that reads x first where ``residual`` allows it."""

    @staticmethod
    def forward(ctx, y, x, compact, inplace, residual=None):  # noqa: ANN001, ANN205
        if inplace:
            ctx.mark_dirty(y)
            out = y
        else:
            out = y.clone()
        ctx.residual = residual
        if compact is None:
            return out.add_(x)
        # a few images at a time: a mixed-precision add would upcast all of ``compact`` into a temporary first
        for rows in _batch_chunks(len(out)):
            out[rows] += compact[rows]
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        if ctx.residual is not None and ctx.needs_input_grad[1] and ctx.residual.hand(grad_out):
            return grad_out, None, None, None, None
        return grad_out, grad_out, None, None, None


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


def expanding_pointwise(source: "ConvSource", x: torch.Tensor) -> bool:
    """Whether ``BatchNormOfExpansion`` applies to a BatchNorm of x, the output of ``source``: a 1×1
    convolution (stride 1, one group) to at least twice its input channels, contiguous float32/64 on the CPU."""
    z, weight = source.tensors[0], source.tensors[1]
    if pointwise_conv_arguments((z, weight, None, *source.options), {}, graph=False) is None:
        return False
    return (
        x.dtype in (torch.float32, torch.float64) and z.dtype == x.dtype and x.is_contiguous()
        and 2 * z.shape[1] <= x.shape[1] and z.untyped_storage().nbytes() > 0
    )


class BatchNormOfExpansion(torch.autograd.Function):
    """Training-mode BatchNorm, with given batch statistics, of a 1×1 convolution that expands the channels
    (a bottleneck's last convolution, k → c ≥ 2k): one node for both, which saves the convolution's k-channel
    input and never holds a c-channel tensor in its backward.

    With x = W z + b, every term of the two backwards that reads x is a product of W with a k-channel sum:

        Σ g·x      = rowsum(W ⊙ P) + b·Σg,                 P  = Σ g zᵀ   (c × k)
        ∂L/∂z      = Wᵀ diag(scale) g − (Wᵀ diag(slope) W) z + Wᵀ (offset − slope·b)
        ∂L/∂W      = diag(scale) P − diag(slope) (W G + b Σzᵀ) + offset Σzᵀ,  G = Σ z zᵀ   (k × k)

    where ∂L/∂x = scale·g − slope·x + offset is training-mode BatchNorm's backward (as
    ``batch_norm_backward`` writes it). Autograd's pair would save x (c channels) for the
    BatchNorm and build ∂L/∂x (c channels) for the convolution: in resnet50's layer1 these were 6 MiB per
    image of a step's VJP. The cost: the Gram products G and Wᵀ diag(slope) W z (k² per position each, a
    quarter of the convolution's kc when c = 4k). x itself is passed detached, for the forward's value only;
    ``in_place`` writes the output into x's buffer, where nothing else reads x (``replay`` knows when).
    """

    @staticmethod
    def forward(ctx, x, z, conv_weight, conv_bias, weight, bias, mean, var, eps, in_place):  # noqa: ANN001, ANN205
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(z, conv_weight, conv_bias, weight, mean, invstd)
        if not in_place:
            return torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
        # x·α + β into x's own buffer, the arithmetic of the eval-mode kernel
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = invstd if weight is None else weight * invstd
        shift = -mean * scale if bias is None else bias - mean * scale
        ctx.mark_dirty(x)
        return torch.addcmul(shift.view(shape), x, scale.view(shape), out=x)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        z, conv_weight, conv_bias, weight, mean, invstd = ctx.saved_tensors
        n, k, h, w = z.shape
        c = conv_weight.shape[0]
        count = n * h * w
        needs = ctx.needs_input_grad
        if not _gram_form_is_cheaper(k, c, count, needs[1], needs[2]):
            return BatchNormOfExpansion._backward_by_recomputation(ctx, grad_out)
        g = grad_out.contiguous().view(n, c, h * w)
        z3 = z.view(n, k, h * w)
        w2 = conv_weight.view(c, k)
        product = _sum_of_products(g, z3)  # P = Σ g zᵀ
        sum_g = g.sum((0, 2))
        sum_gx = (w2 * product).sum(1)
        if conv_bias is not None:
            sum_gx = sum_gx + conv_bias * sum_g
        grad_weight = (sum_gx - mean * sum_g) * invstd  # Σ g·x̂
        scale = invstd if weight is None else weight * invstd
        slope = scale * invstd * grad_weight / count
        offset = slope * mean - scale * sum_g / count
        grad_z = grad_conv_weight = grad_conv_bias = None
        if needs[1]:
            shift = offset if conv_bias is None else offset - slope * conv_bias
            grad_z = _per_image_product(w2.t() * scale, g)
            grad_z.baddbmm_(((w2.t() * slope) @ w2).expand(n, k, k), z3, alpha=-1)
            grad_z += (w2.t() @ shift).view(1, k, 1)
            grad_z = grad_z.view(n, k, h, w)
        if needs[2] or (conv_bias is not None and needs[3]):
            sum_z = z3.sum((0, 2))
            if needs[2]:
                gram = _sum_of_products(z3, z3)
                grad_conv_weight = scale[:, None] * product - slope[:, None] * (w2 @ gram) + offset[:, None] * sum_z[None, :]
                if conv_bias is not None:
                    grad_conv_weight -= (slope * conv_bias)[:, None] * sum_z[None, :]
                grad_conv_weight = grad_conv_weight.view_as(conv_weight)
            if conv_bias is not None and needs[3]:
                grad_conv_bias = scale * sum_g - slope * (w2 @ sum_z + conv_bias * count) + offset * count
        return (
            None, grad_z, grad_conv_weight, grad_conv_bias,
            grad_weight if weight is not None and needs[4] else None, sum_g if needs[5] else None,
            None, None, None, None,
        )


    @staticmethod
    def _backward_by_recomputation(ctx, grad_out):  # noqa: ANN001, ANN205
        """The pair's backward as autograd's, recomputing x = W z + b: cheaper where positions are few beside
        the channels (``_gram_form_is_cheaper``), and there the c-channel tensors are small."""
        z, conv_weight, conv_bias, weight, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        n, k, h, w = z.shape
        c = conv_weight.shape[0]
        x = _pointwise_product(z, conv_weight, conv_bias)
        grad_x, grad_weight, sum_g = batch_norm_backward(grad_out.contiguous(), x, weight, mean, invstd)
        del x
        grad_z = grad_conv_weight = grad_conv_bias = None
        grad3 = grad_x.view(n, c, h * w)
        if needs[1]:
            grad_z = _per_image_product(conv_weight.view(c, k).t(), grad3).view(n, k, h, w)
        if needs[2]:
            grad_conv_weight = _sum_of_products(grad3, z.view(n, k, h * w)).view_as(conv_weight)
        if conv_bias is not None and needs[3]:
            grad_conv_bias = grad3.sum((0, 2))
        return (
            None, grad_z, grad_conv_weight, grad_conv_bias,
            grad_weight if weight is not None and needs[4] else None, sum_g if needs[5] else None,
            None, None, None, None,
        )


def batch_norm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm backward that allocates one tensor of the input's size (the gradient).

    The CPU kernel allocates a second, temporary one; inside a block's VJP that temporary sits on top of
    the step's peak. Here the per-channel sums come from the eval-mode kernel (one fused pass, no
    gradient tensor), and the gradient is two fused multiply-adds into one buffer:

        grad_x = w·invstd · (g - Σg/M - x̂ · Σ(g·x̂)/M),   x̂ = (x - mean)·invstd
               = g·(w·invstd) + x·(-slope) + (slope·mean - w·invstd·Σg/M),   slope = w·invstd³·Σ(g·(x-mean))/M
    """
    c = x.shape[1]
    count = x.numel() / c
    var = invstd.pow(-2)  # the eval kernel takes a variance; eps=0 gives back exactly this invstd
    ones = torch.ones_like(mean) if weight is None else weight
    _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad_out, x, ones, mean, var, None, None, False, 0.0, [False, True, True]
    )  # grad_weight = Σ g·(x - mean)·invstd, grad_bias = Σ g
    scale = invstd if weight is None else weight * invstd
    slope = scale * invstd * grad_weight / count
    offset = slope * mean - scale * grad_bias / count
    shape = (1, c) + (1,) * (x.dim() - 2)
    grad_x = torch.addcmul(offset.reshape(shape), x, slope.neg().reshape(shape))
    grad_x.addcmul_(grad_out, scale.reshape(shape))
    return grad_x, grad_weight, grad_bias


def _gram_form_is_cheaper(k: int, c: int, positions: int, input_grad: bool, weight_grad: bool) -> bool:
    """Multiply-adds of the Gram form (P = Σ g zᵀ, and for the input gradient Wᵀ diag(slope) W and its product
    with z, for the weight gradient Σ z zᵀ and W times it) against recomputing x and running the pair's own
    backward (one k·c product per position each). The Gram form's k²·c terms do not shrink with the positions:
    at resnet50's layer4 with 8 images at 128² (16 positions each) they are 4× the convolution itself."""
    gram = k * c * positions
    recompute = k * c * positions
    if input_grad:
        gram += k * c * positions + k * k * c + k * k * positions
        recompute += k * c * positions
    if weight_grad:
        gram += k * k * positions + c * k * k
        recompute += k * c * positions
    return gram < recompute


_PRIVATE_PAIRS_OF: dict[type, Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]]] = {}
_RESIDUAL_ENTRY_OF: dict[type, Callable[[nn.Module], nn.Module | None]] = {}


def register_private_conv_outputs(
    block_type: type, pairs_of: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]]
) -> None:
    """Declare that blocks of ``block_type`` read the output of each (convolution, BatchNorm) pair that
    ``pairs_of(block)`` names only as the BatchNorm's input. The engine cannot tell this from a block's
    code; the adapter that knows a model family (timm's ``Bottleneck``) says it here, so the engine stays
    free of any model library."""
    _PRIVATE_PAIRS_OF[block_type] = pairs_of


def register_residual_entry(block_type: type, entry_of: Callable[[nn.Module], nn.Module | None]) -> None:
    """Declare that a block of ``block_type`` computes ``act(branch(x) + x)`` where ``entry_of(block)`` (a 1×1
    convolution, or None for blocks where this does not hold, e.g. with a downsampling shortcut) is the first op
    of ``branch`` and the only reader of x besides the sum: the convolution may then take the sum's gradient for
    x and add its own into it (``ResidualGradient``)."""
    _RESIDUAL_ENTRY_OF[block_type] = entry_of


def residual_entry(block: nn.Module) -> nn.Module | None:
    """The convolution registered as a block's residual entry (the caller makes sure no hook in the block could
    see the block's input or its gradient)."""
    entry_of = _RESIDUAL_ENTRY_OF.get(type(block))
    if entry_of is None:
        return None
    conv = entry_of(block)
    return conv if type(conv) is nn.Conv2d else None


def private_conv_outputs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(convolution, BatchNorm) pairs of a block whose code reads the convolution's output only as the
    BatchNorm's input (registered per block type by ``register_private_conv_outputs``). Only where no hook
    could see that output (a forward hook on the convolution, a pre-hook on the BatchNorm, a global one):
    then the BatchNorm may overwrite it."""
    pairs_of = _PRIVATE_PAIRS_OF.get(type(block))
    if pairs_of is None or global_hooks():
        return []
    return [
        (conv, bn) for conv, bn in pairs_of(block)
        if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not hooks_could_see(conv) and not hooks_could_see(bn)
    ]


def global_hooks() -> bool:
    """Whether a module hook registered for every module exists (it is handed every block's inputs and outputs)."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks or _global_backward_hooks or _global_backward_pre_hooks)


def hooks_could_see(module: nn.Module) -> bool:
    """Whether any hook of ``module`` is handed its input or output: a forward hook receives the input as well as
    the output, so a BatchNorm's forward hook sees the convolution's output that an in-place BatchNorm overwrites."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )
