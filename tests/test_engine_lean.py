"""The engine's leaner recomputation graphs (``lightning_resode.adjoint.lean``): the same gradients as plain
autograd, with fewer bytes. Each form is checked against autograd's own ops on real timm blocks, for the
gradient, and against the same engine with that form turned off, for the memory."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import lightning_resode.adjoint.function as engine_function
import lightning_resode.adjoint.lean as lean
from lightning_resode import AdjointSequential
from lightning_resode.measure import step_memory
from stacks import flat_grad, relative_error


def _bottlenecks(layer: str = "layer1", first: int = 1) -> list[nn.Module]:
    torch.manual_seed(0)
    return list(getattr(timm.create_model("resnet50", pretrained=False, zero_init_last=False), layer))[first:]


def _working_set(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> int:
    (model(x) * weight).sum().backward()  # warm-up: one-time allocations stay out of the measurement
    model.zero_grad(set_to_none=True)
    x.grad = None
    measured = step_memory(lambda: (model(x) * weight).sum())
    x.grad = None
    return measured.peak_bytes - measured.backward_start_bytes


def _gradients(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x.grad = None
    (model(x) * weight).sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    return grad_x, flat_grad(model.parameters())


def _assert_float64_gradients_are_autograds(blocks: list[nn.Module], x: torch.Tensor, weight: torch.Tensor) -> None:
    """The stage's gradients against plain autograd's on float64 copies. In float32 a recomputed value that
    rounds to the other side of a ReLU's zero sends one element's gradient another way (measured: 3e-3 of the
    whole gradient, as much as float32 autograd differs from float64 autograd on these blocks), so float32
    gradients cannot be compared tightly; float64 ones can."""
    reference = nn.Sequential(*copy.deepcopy(blocks)).double()
    stage = AdjointSequential(list(copy.deepcopy(reference))).configure(method="block", store_every=None)
    x64, weight64 = x.detach().double().requires_grad_(True), weight.double()
    (grad_x, grads), (expected_x, expected) = _gradients(stage, x64, weight64), _gradients(reference, x64, weight64)
    assert relative_error(grad_x, expected_x) < 1e-10
    assert relative_error(grads, expected) < 1e-10


# ------------------------------------------------------------------------------------ the forms, one at a time
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compact", [False, True])
def test_a_pointwise_convolutions_product_backward_is_autograds(bias: bool, compact: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 12, 6, 7, dtype=torch.float64)
    if compact:  # values that a 16-bit copy holds exactly, as a stored block input's upcast does
        x = x.half().double()
    weight = torch.randn(20, 12, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True) if bias else None
    grad_out = torch.randn(5, 20, 6, 7, dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    inputs = [leaf, weight] + ([b] if bias else [])
    expected = torch.autograd.grad(F.conv2d(leaf, weight, b), inputs, grad_out)
    out = lean.PointwiseConv.apply(leaf, weight, b, x.half() if compact else None)
    got = torch.autograd.grad(out, inputs, grad_out)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_only_plain_pointwise_convolutions_take_the_product_form() -> None:
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    one = torch.randn(6, 4, 1, 1)
    assert lean.pointwise_conv_arguments((x, one), {}) is not None
    assert lean.pointwise_conv_arguments((x, one, None, 2), {}) is None  # strided
    assert lean.pointwise_conv_arguments((x, one, None, 1, 1), {}) is None  # padded
    assert lean.pointwise_conv_arguments((x, torch.randn(6, 4, 3, 3)), {}) is None  # 3x3
    assert lean.pointwise_conv_arguments((x, torch.randn(4, 2, 1, 1), None, 1, 0, 1, 2), {}) is None  # grouped
    assert lean.pointwise_conv_arguments((x.to(memory_format=torch.channels_last), one), {}) is None
    with torch.no_grad():
        assert lean.pointwise_conv_arguments((x, one), {}) is None  # nothing to save without a graph


def test_the_masked_relu_passes_gradients_where_relu_does_including_non_finite_ones() -> None:
    """ReLU's own backward gives 0 where its output is 0, whatever the incoming gradient (an infinite one
    included), and passes it where the output is NaN; a product with a mask would make NaNs of the first."""
    x = torch.tensor([-1.0, 0.0, 2.0, float("nan"), -0.0], requires_grad=True)
    grad = torch.tensor([float("inf"), float("nan"), 3.0, 4.0, float("inf")])
    (masked,) = torch.autograd.grad(lean.ReluKeepingMask.apply(x * 1, False, None), x, grad)
    (plain,) = torch.autograd.grad(torch.relu(x * 1), x, grad)
    assert torch.equal(masked.nan_to_num(7.0), plain.nan_to_num(7.0)), (masked, plain)
    y = x * 1
    out = lean.ReluKeepingMask.apply(y, True, None)  # timm's in-place ReLU
    assert out is y


def test_the_masked_relu_writes_into_the_gradient_it_is_handed_only_where_that_is_the_engines_own() -> None:
    """A step's VJP starts from a ``StepGradient``: the ReLU of the step's output writes its gradient into it
    when it is private (one state-sized tensor less), and into a new tensor when it is the stage's incoming
    gradient, which a user's hook may hold. Either way the values are ReLU's."""
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    (expected,) = torch.autograd.grad(torch.relu(x * 1), x, torch.full_like(x, 2.0))
    for private in (True, False):
        given = torch.full_like(x, 2.0)
        holder = lean.StepGradient(given, private=private)

        class Root(torch.autograd.Function):
            @staticmethod
            def forward(ctx, out):  # noqa: ANN001, ANN205
                return out.sum()

            @staticmethod
            def backward(ctx, _unit):  # noqa: ANN001, ANN205
                return holder.hand_over()

        (grad,) = torch.autograd.grad(Root.apply(lean.ReluKeepingMask.apply(x * 1, True, holder)), x)
        assert torch.equal(grad, expected)
        # written into (private) or left as it was (the incoming gradient)
        assert torch.equal(given, expected if private else torch.full_like(x, 2.0)), private


# ------------------------------------------------------------------------------------ inside the engine
def test_a_steps_backward_keeps_a_mask_of_the_residual_sums_relu_not_the_block_output(monkeypatch) -> None:
    """In a step's VJP the block output is what the ReLU after the residual sum saves, and nothing else in the
    step's graph needs it: the recomputation keeps a 1-byte mask there instead (timm applies that ReLU in
    place, so this covers the in-place form). The gradients stay plain autograd's."""
    blocks = _bottlenecks()
    x = torch.randn(8, 256, 28, 28, requires_grad=True)
    weight = torch.randn(8, 256, 28, 28)
    stage = AdjointSequential(blocks).configure(method="block", store_every=None)
    # the fused BatchNorm of conv3 lowers the step's VJP below the stage's other peaks (measured: 4.0 block
    # outputs with or without the mask); without it the VJP is the peak, and the mask's saving shows
    monkeypatch.setattr(lean, "expanding_pointwise", lambda source, x: False)
    masked = _working_set(stage, x, weight)  # measured 4.38 block outputs (8×256×28²)
    with monkeypatch.context() as patch:  # the same engine, the ReLU saving its output as autograd's does
        patch.setattr(lean, "RELUS", frozenset())
        plain = _working_set(stage, x, weight)  # measured 5.00
    output_bytes = x.numel() * x.element_size()
    assert masked <= plain - output_bytes // 4, (masked / output_bytes, plain / output_bytes)
    _assert_float64_gradients_are_autograds(blocks, x, weight)


def test_a_16_bit_steps_vjp_keeps_the_stored_input_not_its_float32_copy(monkeypatch) -> None:
    """``block_fp16``: a bottleneck reads its input in a 1×1 convolution and the residual sum only. Both read
    the stored 16-bit input (the convolution saves it), so its float32 copy is never made: the working set
    drops by more than half an input; the gradients are the upcast copy's graph's (up to the order of float32
    sums: the convolution reads the 16-bit copy a few images at a time)."""
    blocks = _bottlenecks()
    x = torch.randn(8, 256, 28, 28, requires_grad=True)
    weight = torch.randn(8, 256, 28, 28)
    stage = AdjointSequential(blocks).configure(method="block_fp16")
    compact = _working_set(stage, x, weight)
    grads_compact = _gradients(stage, x, weight)
    with monkeypatch.context() as patch:
        patch.setattr(engine_function, "_single_evaluation", lambda scheme: False)
        upcast = _working_set(stage, x, weight)
        grads_upcast = _gradients(stage, x, weight)
    input_bytes = x.numel() * x.element_size()
    assert compact <= upcast - input_bytes // 2, (compact / input_bytes, upcast / input_bytes)
    assert relative_error(grads_compact[0], grads_upcast[0]) < 1e-6
    assert relative_error(grads_compact[1], grads_upcast[1]) < 1e-6


class _ReadsItsInputTwice(nn.Module):
    """A block whose input also feeds a scaled copy and a 3x3 convolution: ops the compact input does not cover."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels // 2)
        self.expand = nn.Conv2d(channels // 2, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(0.5 * x + self.expand(torch.relu(self.bn(self.reduce(x)))) + x)


class _ReadsItsInputInAList(nn.Module):
    """The input reaches an op inside a list (``torch.cat``) and as a view (a slice of it)."""

    def __init__(self, channels: int, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        shortcut = torch.cat([x, x], 1)[:, :c] if self.how == "cat" else torch.stack([x[:, : c // 2], x[:, c // 2 :]], 1).flatten(1, 2)
        return torch.relu(self.bn(self.conv(x)) + shortcut)


@pytest.mark.parametrize("block", ["twice", "cat", "stack"])
def test_a_block_that_reads_its_input_elsewhere_gets_the_float32_values_first(monkeypatch, block: str) -> None:
    """Any op other than the covered two that reads the step input (or a view of it, or a list holding it) makes
    the float32 copy before it runs: the gradients are those of the plain upcast path, bit for bit, not of a
    tensor without values (before, ``torch.cat([x, x])`` read freed memory: a segmentation fault)."""
    torch.manual_seed(0)
    blocks = [_ReadsItsInputTwice(16) if block == "twice" else _ReadsItsInputInAList(16, block) for _ in range(3)]
    x = torch.randn(6, 16, 10, 10, requires_grad=True)
    weight = torch.randn(6, 16, 10, 10)
    stage = AdjointSequential(blocks).configure(method="block_fp16")
    got = _gradients(stage, x, weight)
    with monkeypatch.context() as patch:
        patch.setattr(engine_function, "_single_evaluation", lambda scheme: False)
        expected = _gradients(stage, x, weight)
    assert torch.isfinite(got[1]).all()
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def test_a_block_input_kept_by_a_forward_hook_has_its_values_after_the_backward() -> None:
    """A hook that keeps a block's input (feature extraction) is called again in the recomputation: it must get a
    tensor it can read later (before, a tensor without storage: reading it crashed the process)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False, zero_init_last=False, channels=[16, 32, 64, 128])
    from lightning_resode import to_adjoint

    model = to_adjoint(model, scheme="block_fp16", check=False).train()
    kept: list[torch.Tensor] = []
    model.layer1[1].register_forward_hook(lambda module, inputs, output: kept.append(inputs[0]))
    x = torch.randn(4, 3, 64, 64)
    forward_input = None
    model(x).square().mean().backward()
    forward_input, recomputed = kept[0], kept[-1]
    assert len(kept) == 2 and recomputed.untyped_storage().nbytes() == recomputed.numel() * recomputed.element_size()
    # the recomputation's input is the stored 16-bit input, upcast: the forward's, rounded
    torch.testing.assert_close(recomputed, forward_input.detach().half().float(), rtol=0, atol=0)


class _InPlaceBetweenConvAndNorm(nn.Module):
    """conv -> in-place activation -> BatchNorm, then a shape change: a stage head whose BatchNorm does not read the
    convolution's output as the convolution made it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.relu_()
        return self.bn(y)


def test_a_convolution_output_changed_in_place_is_not_recomputed_for_its_batchnorm() -> None:
    """The head's BatchNorm may only recompute its input from the convolution if nothing wrote into it since
    (before: exact ``block`` gave the head's weights 0.99 cosine against autograd, silently)."""
    torch.manual_seed(0)
    blocks = [_InPlaceBetweenConvAndNorm().double()] + [
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)).double() for _ in range(2)
    ]
    stage = AdjointSequential(blocks, exact_head=1).configure(method="block", store_every=None)
    reference = copy.deepcopy(nn.Sequential(*blocks))
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 16, 6, 6, dtype=torch.float64)
    (grad_x, grads), (expected_x, expected) = _gradients(stage, x, weight), _gradients(reference, x, weight)
    assert relative_error(grad_x, expected_x) < 1e-12
    assert relative_error(grads, expected) < 1e-12


def test_a_heads_batchnorms_recompute_their_convolutions_output_and_keep_autograds_gradient(monkeypatch) -> None:
    """timm's layer1 head (64 -> 256 channels, with a downsample convolution): its two 256-channel BatchNorms
    save their convolutions' 64-channel inputs and recompute their own inputs in the VJP."""
    torch.manual_seed(0)
    blocks = list(timm.create_model("resnet50", pretrained=False, zero_init_last=False).layer1)
    x = torch.randn(8, 64, 28, 28, requires_grad=True)
    weight = torch.randn(8, 256, 28, 28)
    # 16-bit steps: their VJPs need less than the head's, whose working set is then the stage's
    stage = AdjointSequential(blocks, exact_head=1).configure(method="block_fp16", store_every=None)
    reference = copy.deepcopy(nn.Sequential(*blocks))
    recomputed = _working_set(stage, x, weight)
    with monkeypatch.context() as patch:
        patch.setattr(lean.ConvSource, "of", staticmethod(lambda args, kwargs, out: None))
        kept = _working_set(stage, x, weight)
    output_bytes = weight.numel() * weight.element_size()
    assert recomputed <= kept - output_bytes // 2, (recomputed / output_bytes, kept / output_bytes)
    stage.configure(method="block")  # exact: the gradients are autograd's
    (grad_x, grads), (expected_x, expected) = _gradients(stage, x, weight), _gradients(reference, x, weight)
    assert relative_error(grad_x, expected_x) < 1e-5
    assert relative_error(grads, expected) < 1e-5


@pytest.mark.parametrize("lean_graphs", [True, False, "head", ("head", "head_recompute"), "steps"])
def test_lean_graphs_give_plain_autograds_gradients_in_float64_on_a_whole_timm_resnet(lean_graphs) -> None:
    """Every form at once (exact ``block``, heads, steps), float64, against timm's network with plain autograd; and
    with the leaner graphs in one part only, or none (``lean_graphs``, which the auto policy sets per stage)."""
    from lightning_resode import adjoint_stages, to_adjoint

    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False, zero_init_last=False, channels=[16, 32, 64, 128]).double()
    converted = to_adjoint(copy.deepcopy(model), scheme="block", check=False)
    for stage in adjoint_stages(converted).values():
        stage.lean_graphs = lean_graphs
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for m in (model, converted):
        m.train()
        m(x).square().mean().backward()
    # the fused BatchNorm-of-expansion node sums in another order than autograd's pair: float64 round-off
    # (1e-13 of a gradient's norm), so each gradient is compared as a whole, not element by element
    for (name, p), q in zip(model.named_parameters(), converted.parameters()):
        assert relative_error(q.grad, p.grad) < 1e-10, name


def _backward_each(models: tuple[nn.Module, ...], x: torch.Tensor, handles: list) -> None:
    """One training forward and backward of each model on x, then the hooks removed (also when one fails)."""
    try:
        for m in models:
            m.train()
            m(x).square().mean().backward()
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------ a BatchNorm of an expanding 1×1 convolution
@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("frozen_conv", [False, True])
@pytest.mark.parametrize("gram_form", [False, True])
def test_a_batchnorm_of_an_expanding_convolution_is_one_node_with_autograds_gradient(
    conv_bias, affine, in_place, frozen_conv, gram_form, monkeypatch
) -> None:
    """conv (4 -> 12 channels, 1×1) then training-mode BatchNorm: one node that saves the 4-channel input gives
    autograd's output and every gradient of the pair (float64), with its own statistics given as the engine's;
    by either of its backwards (Gram products, or recomputing the convolution where positions are few)."""
    monkeypatch.setattr(lean, "_gram_form_is_cheaper", lambda *args: gram_form)
    torch.manual_seed(0)
    z = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    conv_weight = torch.randn(12, 4, 1, 1, dtype=torch.float64, requires_grad=not frozen_conv)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True) if conv_bias else None
    gamma = torch.randn(12, dtype=torch.float64, requires_grad=True) if affine else None
    beta = torch.randn(12, dtype=torch.float64, requires_grad=True) if affine else None
    grad_out = torch.randn(3, 12, 5, 6, dtype=torch.float64)
    inputs = [t for t in (z, conv_weight, bias, gamma, beta) if t is not None and t.requires_grad]
    expected_out = F.batch_norm(F.conv2d(z, conv_weight, bias), None, None, gamma, beta, True, 0.1, 1e-5)
    expected = torch.autograd.grad(expected_out, inputs, grad_out)
    x = F.conv2d(z, conv_weight, bias).detach()
    var, mean = torch.var_mean(x, dim=[0, 2, 3], correction=0)
    out = lean.BatchNormOfExpansion.apply(x, z, conv_weight, bias, gamma, beta, mean, var, 1e-5, in_place)
    assert (out.data_ptr() == x.data_ptr()) == in_place
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(out, inputs, grad_out)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_a_steps_vjp_holds_neither_the_batchnorm_input_nor_its_gradient_at_the_expansion(monkeypatch) -> None:
    """In a bottleneck step's VJP the 4×-channel convolution output is no longer saved for its BatchNorm (which
    writes its output into it), and its gradient is never made. Measured on two layer1 blocks, 8×256×28², exact
    block inputs, in block outputs: 5.00 → 4.00 with the ReLU saving its output as autograd's does, 4.38 → 4.00
    with the engine's 1-byte ReLU mask (where the stage's other peaks take over). The gradients stay autograd's."""
    blocks = _bottlenecks()
    x = torch.randn(8, 256, 28, 28, requires_grad=True)
    weight = torch.randn(8, 256, 28, 28)
    stage = AdjointSequential(blocks).configure(method="block", store_every=None)

    def fused_and_separate() -> tuple[int, int]:
        fused = _working_set(stage, x, weight)
        with monkeypatch.context() as patch:  # the same engine, BatchNorm saving its input as autograd's does
            patch.setattr(lean, "expanding_pointwise", lambda source, x: False)
            return fused, _working_set(stage, x, weight)

    output_bytes = x.numel() * x.element_size()
    fused, separate = fused_and_separate()
    assert fused <= separate - output_bytes // 4, (fused / output_bytes, separate / output_bytes)
    with monkeypatch.context() as patch:
        patch.setattr(lean, "RELUS", frozenset())
        fused, separate = fused_and_separate()
    assert fused <= separate - 3 * output_bytes // 4, (fused / output_bytes, separate / output_bytes)
    _assert_float64_gradients_are_autograds(blocks, x, weight)


@pytest.mark.parametrize("hook_on", ["conv3", "bn3", "bn3 forward hook"])
def test_a_convolution_output_a_hook_can_see_is_not_overwritten_by_its_batchnorm(hook_on) -> None:
    """A forward hook on conv3 (or a pre-hook on bn3) keeps conv3's output from the recomputation: it must still
    hold the convolution's output after the backward, so the BatchNorm writes its own output elsewhere."""
    torch.manual_seed(0)
    blocks = _bottlenecks()
    stage = AdjointSequential(blocks).configure(method="block", store_every=None)
    seen: list[torch.Tensor] = []
    conv_inputs: list[torch.Tensor] = []
    block = blocks[1]
    handles = [block.conv3.register_forward_pre_hook(lambda module, inputs: conv_inputs.append(inputs[0].detach().clone()))]
    if hook_on == "conv3":
        handles.append(block.conv3.register_forward_hook(lambda module, inputs, output: seen.append(output)))
    elif hook_on == "bn3":
        handles.append(block.bn3.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0])))
    else:  # a forward hook is handed the input as well as the output
        handles.append(block.bn3.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0])))
    x = torch.randn(4, 256, 14, 14, requires_grad=True)
    (stage(x) * torch.randn(4, 256, 14, 14)).sum().backward()
    for handle in handles:
        handle.remove()
    assert len(seen) == len(conv_inputs) == 2  # the forward's and the recomputation's
    for conv_input, output in zip(conv_inputs, seen):
        torch.testing.assert_close(output.detach(), F.conv2d(conv_input, block.conv3.weight.detach()), rtol=1e-5, atol=1e-5)


def test_the_gram_form_is_chosen_where_positions_outnumber_the_channels() -> None:
    """resnet50's bottleneck expansions (c = 4k), with both gradients: Gram products pay k²·c terms that do not
    shrink with the positions, so they win only where the positions are several times k."""
    assert lean._gram_form_is_cheaper(64, 256, 8 * 32 * 32, True, True)  # layer1, 8 images at 128²
    assert not lean._gram_form_is_cheaper(512, 2048, 8 * 4 * 4, True, True)  # layer4, 8 images at 128²
    assert not lean._gram_form_is_cheaper(256, 1024, 256, True, True)  # positions = k
    assert lean._gram_form_is_cheaper(256, 1024, 64 * 14 * 14, True, True)  # layer3, 64 images at 224²


@pytest.mark.parametrize("hook", ["bn3 forward hook", "conv3 backward hook", "downsample bn forward hook", "global forward hook"])
def test_hooks_that_read_a_batchnorms_input_get_plain_timms_gradients(hook) -> None:
    """A user's hook that reads bn3's input (conv3's output) and changes the block: a new user found a forward hook
    on bn3 gave cosine 0.97 with the exact method, the BatchNorm having overwritten the input the hook read."""
    from lightning_resode import to_adjoint

    torch.manual_seed(0)
    model = timm.create_model("resnet26", zero_init_last=False, channels=[16, 32, 64, 128], num_classes=5).double()
    converted = to_adjoint(copy.deepcopy(model), scheme="block", check=False)

    def target(m: nn.Module) -> nn.Module:
        if hook.startswith("downsample"):
            return m.layer2[0].downsample[1]
        return m.layer2[1].conv3 if hook.startswith("conv3") else m.layer2[1].bn3

    handles = []
    for bn in (target(model), target(converted)):
        if hook == "global forward hook":  # each acts on its own model's BatchNorm only
            handles.append(nn.modules.module.register_module_forward_hook(
                lambda m, inputs, output, bn=bn: output + 0.5 * inputs[0] if m is bn else None))
        elif hook == "conv3 backward hook":  # (timm adds to bn3's output in place: no backward hook there)
            handles.append(bn.register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0] * 2,)))
        else:
            handles.append(bn.register_forward_hook(lambda m, inputs, output: output + 0.5 * inputs[0]))
    _backward_each((model, converted), torch.randn(4, 3, 32, 32, dtype=torch.float64), handles)
    expected = flat_grad(model.parameters())
    assert relative_error(flat_grad(converted.parameters()), expected) < 1e-10


def test_a_tensor_hook_on_a_blocks_output_gets_plain_timms_gradient() -> None:
    """A step's ReLU writes its gradient into the gradient it receives where only the engine holds that one; a
    user's tensor hook on a block's output (registered from a forward hook) holds it too, and must see the value
    autograd gives it, not the ReLU's (layer2[1] is the lowest of three steps: its gradient comes from the step
    above). Also the stage's incoming gradient, which a hook on the stage output keeps."""
    from lightning_resode import to_adjoint

    torch.manual_seed(0)
    # large residual branches: each block's ReLU zeroes other positions than the next one's
    model = timm.create_model("resnet50", zero_init_last=False, channels=[16, 32, 64, 128], num_classes=5).double()
    converted = to_adjoint(copy.deepcopy(model), scheme="block", check=False)
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "converted": []}
    handles = []
    for key, m in (("plain", model), ("converted", converted)):
        def keep_output_grad(module, inputs, output, key=key):  # noqa: ANN001, ANN202
            if output.requires_grad:  # inside a converted stage: in the step's recomputation, not in the forward
                output.register_hook(lambda g: seen[key].append(g.clone() if key == "plain" else g))
        handles.append(m.layer2[1].register_forward_hook(keep_output_grad))
        handles.append(m.layer3.register_forward_hook(keep_output_grad))
    _backward_each((model, converted), torch.randn(4, 3, 32, 32, dtype=torch.float64), handles)
    assert len(seen["plain"]) == len(seen["converted"]) == 2
    for plain, ours in zip(seen["plain"], seen["converted"]):
        assert relative_error(ours, plain) < 1e-6
    assert relative_error(flat_grad(converted.parameters()), flat_grad(model.parameters())) < 1e-6


def test_a_gradient_a_hook_was_handed_is_never_written_afterwards() -> None:
    """A step's ReLU and its first 1×1 convolution write into the gradient the step above handed down, where that is
    the engine's own. A backward hook on the block above holds it too (its grad_input is this gradient): the kept
    tensor must still hold what autograd gave it."""
    from lightning_resode import to_adjoint

    torch.manual_seed(0)
    model = timm.create_model("resnet50", zero_init_last=False, channels=[16, 32, 64, 128], num_classes=5).double()
    converted = to_adjoint(copy.deepcopy(model), scheme="block", check=False)
    kept: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"plain": [], "converted": []}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for key, m in (("plain", model), ("converted", converted)):
        handle = m.layer1[2].register_full_backward_hook(lambda mod, gi, go, key=key: kept[key].append((gi[0], gi[0].clone())))
        try:
            m.train()
            m(x).square().mean().backward()
        finally:
            handle.remove()
    plain_value = kept["plain"][-1][1]
    held, value_when_handed = kept["converted"][-1]
    assert relative_error(value_when_handed, plain_value) < 1e-10
    assert relative_error(held, plain_value) < 1e-10, "a gradient handed to a hook was overwritten afterwards"


def test_a_global_backward_pre_hook_keeps_the_gradients_it_was_handed() -> None:
    """A global module backward pre-hook is handed each block's output gradient; the step must not write into it."""
    from torch.nn.modules.module import register_module_full_backward_pre_hook

    class Block(nn.Module):  # timm's in-place residual sum refuses module backward hooks: a block without one
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.bn(self.conv(x)))

    torch.manual_seed(0)
    blocks = [Block() for _ in range(4)]
    plain = nn.Sequential(*copy.deepcopy(blocks)).double()
    stage = AdjointSequential(copy.deepcopy(blocks), gradient="block").double()
    x = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    kept: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"plain": [], "stage": []}
    for key, m in (("plain", plain), ("stage", stage)):
        handle = register_module_full_backward_pre_hook(
            lambda mod, go, key=key: kept[key].append((go[0], go[0].clone())) if isinstance(mod, Block) else None
        )
        try:
            m.train()
            m(x).square().mean().backward()
        finally:
            handle.remove()
    # the stage's recomputations call each block's hooks again: its last calls are the backward's
    for (_, plain_value), (held, value_when_handed) in zip(kept["plain"], kept["stage"][-len(kept["plain"]) :]):
        assert relative_error(value_when_handed, plain_value) < 1e-10
        assert relative_error(held, plain_value) < 1e-10, "a gradient handed to a hook was overwritten afterwards"
