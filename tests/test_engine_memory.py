"""Saved activation bytes, measured as docs/design.md defines them: flat in depth for adjoint stages."""

import pytest
import torch

from lightning_resode import AdjointSequential, saved_activation_bytes
from stacks import conv_blocks, flat_grad, relative_error, smooth_blocks


def _saved_bytes(stage: AdjointSequential, x: torch.Tensor) -> int:
    return saved_activation_bytes(stage, lambda: stage(x))


@pytest.mark.parametrize("scheme", ["euler", "euler_fast", "heun"])
def test_adjoint_saved_bytes_do_not_grow_with_depth(scheme):
    x = torch.randn(32, 64, dtype=torch.float32, requires_grad=True)
    shallow = _saved_bytes(AdjointSequential(smooth_blocks(16, width=64, dtype=torch.float32), scheme), x)
    deep = _saved_bytes(AdjointSequential(smooth_blocks(512, width=64, dtype=torch.float32), scheme), x)
    state_bytes = x.numel() * x.element_size()
    assert deep == shallow
    assert shallow <= 2 * state_bytes  # the stage output (the input belongs to the caller)
    backprop_deep = _saved_bytes(AdjointSequential(smooth_blocks(512, width=64, dtype=torch.float32), scheme,
                                                   gradient="backprop"), x)
    assert backprop_deep > 100 * deep


def test_batchnorm_stacks_keep_only_statistics_per_block():
    """With BatchNorm the stage also keeps each evaluation's batch statistics: 2 floats per channel."""
    channels, x = 4, torch.randn(8, 4, 16, 16, requires_grad=True)
    shallow = _saved_bytes(AdjointSequential(conv_blocks(16, channels)), x)
    deep = _saved_bytes(AdjointSequential(conv_blocks(128, channels)), x)
    statistics_per_block = 2 * 2 * channels * 4  # 2 BatchNorms x (mean, var) x C floats
    assert deep - shallow == (128 - 16) * statistics_per_block
    per_block_backprop = _saved_bytes(AdjointSequential(conv_blocks(16, channels), gradient="backprop"), x) / 16
    assert statistics_per_block < per_block_backprop / 100


def test_anchors_cost_one_state_each():
    x = torch.randn(16, 64, requires_grad=True)
    blocks = smooth_blocks(64, width=64, dtype=torch.float32)
    plain = _saved_bytes(AdjointSequential(blocks, "euler"), x)
    anchored = _saved_bytes(AdjointSequential(blocks, "euler", anchor_every=16), x)
    assert anchored - plain == 3 * x.numel() * x.element_size()  # anchors at steps 16, 32, 48


def test_checkpoint_keeps_only_the_stage_input():
    x = torch.randn(16, 64, requires_grad=True)
    x_bytes = x.numel() * x.element_size()
    saved = _saved_bytes(AdjointSequential(smooth_blocks(64, width=64, dtype=torch.float32), gradient="checkpoint"), x)
    assert saved == x_bytes


def test_the_kept_top_step_costs_half_a_state_in_bfloat16():
    x = torch.randn(16, 64, requires_grad=True)
    blocks = smooth_blocks(32, width=64, dtype=torch.float32)
    plain = _saved_bytes(AdjointSequential(blocks, "euler_fast"), x)
    kept = _saved_bytes(AdjointSequential(blocks, "euler_fast", top_step_dtype=torch.bfloat16), x)
    assert kept - plain == x.numel() * 2


@pytest.mark.parametrize("method, extra_states", [("block", 0.0), ("block_fp16", 0.5), ("euler", 0.5), ("euler_fast", 1.5)])
def test_a_stage_backward_needs_one_blocks_working_set_and_the_state_it_rebuilds(method, extra_states):
    """Peak of a 12-block stage's backward, over what was live when it started, in states S.

    Bound: what one block's plain autograd training step needs (its graph and backward), plus the stage's
    own extra state: none for stored exact inputs, the float32 copy of a float16 input (S/2 on top of
    it), the reconstructed input (euler), and also the cache of the block above (euler_fast). Nothing may
    hold the stage's incoming gradient or a running gradient besides the VJP's own (2 S more before).
    """
    from lightning_resode.measure import step_memory

    torch.manual_seed(0)
    blocks = conv_blocks(12, channels=16, scale=0.1)
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    weight = torch.randn_like(x)
    state = x.numel() * x.element_size()
    stage = AdjointSequential(blocks).configure(method=method, store_every=None)
    (stage(x) * weight).sum().backward()  # warm-up: allocator and kernels settle
    stage.zero_grad(set_to_none=True)
    chained = step_memory(lambda: (stage(x) * weight).sum())
    stage.zero_grad(set_to_none=True)
    one_block = step_memory(lambda: (blocks[0](x) * weight).sum())
    working_set = chained.peak_bytes - chained.backward_start_bytes
    assert working_set <= one_block.peak_bytes + (extra_states + 0.1) * state, (working_set / state, one_block.peak_bytes / state)


def test_a_fallback_that_is_not_needed_holds_nothing_during_the_heads_backward():
    """With fallback on, a 16-bit stage keeps its incoming gradient in case it must recompute exactly; once the
    checks pass it must drop it before the exact head's VJP, which is where a timm stage peaks (a downsampling block).
    """
    from lightning_resode.measure import step_memory

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, stride=1, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU())
    blocks = [head, *conv_blocks(4, channels=32, scale=0.1)]
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    weight = torch.randn(8, 32, 32, 32)
    gradient_bytes = weight.numel() * weight.element_size()

    def working_set(fallback: bool) -> int:
        stage = AdjointSequential(blocks, exact_head=1).configure(method="block_fp16", store_every=None)
        stage.fallback = fallback
        (stage(x) * weight).sum().backward()
        stage.zero_grad(set_to_none=True)
        measured = step_memory(lambda: (stage(x) * weight).sum())
        return measured.peak_bytes - measured.backward_start_bytes

    without, with_fallback = working_set(False), working_set(True)
    assert with_fallback < without + gradient_bytes / 2, (with_fallback / gradient_bytes, without / gradient_bytes)


@pytest.mark.parametrize("fallback", [False, True], ids=["no_fallback", "fallback"])
def test_the_reconstruction_error_behind_a_head_is_measured_without_holding_the_whole_reconstruction(monkeypatch, fallback):
    """An adjoint stage compares x̂ with the exact head's output: without a fallback once the head's graph is
    built, with one before, after a forward of the head without a graph. Held whole, x̂ would sit beside either
    (the peak of an ODE-like resnet50 without a fallback, and with one); only a 1/16 sample of it may."""
    import timm

    import lightning_resode.adjoint.function as engine_function
    from lightning_resode.measure import step_memory

    torch.manual_seed(0)
    blocks = list(timm.create_model("resnet50", pretrained=False, zero_init_last=True).layer2)
    x = torch.randn(8, 256, 28, 28, requires_grad=True)
    weight = torch.randn(8, 512, 14, 14)
    stage = AdjointSequential(blocks, exact_head=1).configure(method="euler_fast", store_every=None)
    stage.fallback = fallback

    def working_set() -> int:
        (stage(x) * weight).sum().backward()
        stage.zero_grad(set_to_none=True)
        measured = step_memory(lambda: (stage(x) * weight).sum())
        return measured.peak_bytes - measured.backward_start_bytes

    sampled = working_set()
    with monkeypatch.context() as patch:  # the whole x̂, as it was held before
        patch.setattr(engine_function, "ERROR_SAMPLE_STRIDE", 1)
        whole = working_set()
    assert stage.last_backward.reconstruction_error is not None
    state_bytes = weight.numel() * weight.element_size()
    assert sampled <= whole - 0.4 * state_bytes, (sampled / state_bytes, whole / state_bytes)


def test_a_downsampling_heads_backward_keeps_the_strided_shortcut_small(monkeypatch):
    """timm's downsampling block: its 1x1 stride-2 shortcut convolution reads every other row and column of the
    block input. Plain autograd's VJP holds a full-size input gradient for it beside the main path's (and, on the
    CPU, a full-size strided copy of the input); the engine's head VJP keeps that gradient subsampled. Exact."""
    import copy

    import timm

    from lightning_resode.measure import step_memory

    torch.manual_seed(0)
    blocks = list(timm.create_model("resnet50", pretrained=False, zero_init_last=False).layer2)
    x = torch.randn(8, 256, 28, 28, requires_grad=True)
    weight = torch.randn(8, 512, 14, 14)
    stage = AdjointSequential(blocks, exact_head=1).configure(method="block", store_every=None)
    reference = copy.deepcopy(torch.nn.Sequential(*blocks))

    def working_set(model: torch.nn.Module) -> int:
        (model(x) * weight).sum().backward()
        model.zero_grad(set_to_none=True)
        x.grad = None
        measured = step_memory(lambda: (model(x) * weight).sum())
        return measured.peak_bytes - measured.backward_start_bytes

    import lightning_resode.adjoint.function as engine_function

    subsampled = working_set(stage)
    with monkeypatch.context() as patch:  # the same engine, the shortcut read as plain autograd would
        patch.setattr(engine_function, "_strided_pointwise", lambda module: False)
        full = working_set(stage)
    input_bytes = x.numel() * x.element_size()
    assert subsampled <= full - input_bytes, (subsampled / input_bytes, full / input_bytes)
    # and the gradient is plain autograd's
    x.grad = None
    (reference(x) * weight).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    stage.zero_grad(set_to_none=True)
    (stage(x) * weight).sum().backward()
    assert relative_error(x.grad, expected) < 1e-5
    assert relative_error(flat_grad(stage.parameters()), flat_grad(reference.parameters())) < 1e-5

