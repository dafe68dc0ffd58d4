"""Loud failures with messages that name the stage, the block and what would be valid."""

import pytest
import torch
from torch import nn

from lightning_resode import (
    AdjointError,
    AdjointSequential,
    DoubleBackwardError,
    ReconstructionError,
    ShapeChangeError,
)
from stacks import conv_blocks, smooth_blocks


def test_a_block_that_changes_the_shape_is_named():
    blocks = [*smooth_blocks(3), nn.Linear(8, 5).double()]
    stage = AdjointSequential(blocks, name="layer3")
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ShapeChangeError, match=r"layer3: block 3 \(Linear\).*\(2, 8\) to \(2, 5\)"):
        stage(x)
    with pytest.raises(ShapeChangeError):
        stage.eval()(x)


def test_a_shape_changing_first_block_is_fine_in_the_exact_head():
    blocks = [nn.Linear(5, 8).double(), *smooth_blocks(6)]
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    stage = AdjointSequential(blocks, "euler", exact_head=1)
    stage(x).sum().backward()
    reference = AdjointSequential(blocks, gradient="backprop", exact_head=1)
    (exact,) = torch.autograd.grad(reference(x).sum(), x)
    assert float((x.grad - exact).norm() / exact.norm()) < 0.05
    assert stage.last_backward.reconstruction_error is not None


class _Explosive(nn.Module):
    """Harmless forward, but its reverse step blows up: g(x) = x^5 explodes away from the forward's states."""

    def forward(self, x):
        return x + x.pow(5)


def test_non_finite_reconstruction_is_named_and_leaves_weights_untouched():
    blocks = [*smooth_blocks(4), _Explosive(), _Explosive(), *smooth_blocks(2, seed=3)]
    stage = AdjointSequential(blocks, "euler", name="layer2")
    x = torch.full((2, 8), 1.2, dtype=torch.float64, requires_grad=True)
    out = stage(x)
    with pytest.raises(ReconstructionError, match=r"layer2: non-finite values in the reconstruction of block \d"):
        out.sum().backward()
    assert all(p.grad is None for p in stage.parameters())


def test_double_backward_is_refused():
    stage = AdjointSequential(smooth_blocks(4))
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(DoubleBackwardError, match="create_graph"):
        torch.autograd.grad(stage(x).sum(), x, create_graph=True)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(scheme="rk4"), r"unknown scheme 'rk4'; valid schemes: \['euler', 'euler_fast', 'heun'\]"),
        (dict(gradient="reversible"), r"unknown gradient 'reversible'"),
        (dict(refine=-1), r"refine must be >= 0"),
        (dict(anchor_every=0), r"anchor_every must be a positive"),
        (dict(exact_head=9), r"exact_head must be between 0 and 4"),
        (dict(top_step_dtype=torch.int8), r"top_step_dtype must be a floating torch.dtype or None"),
    ],
)
def test_bad_options_fail_early_and_say_what_is_valid(options, message):
    with pytest.raises(ValueError, match=message):
        AdjointSequential(smooth_blocks(4), **options)


def test_heun_needs_two_blocks():
    with pytest.raises(ValueError, match="at least 2 residual blocks"):
        AdjointSequential(smooth_blocks(1), "heun")


def test_reconstruction_error_is_reported_when_the_input_is_kept():
    x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    errors = {}
    for refine in (0, 2):
        stage = AdjointSequential(smooth_blocks(32), "euler", refine=refine, keep_input=True)
        stage(x).sum().backward()
        errors[refine] = stage.last_backward.reconstruction_error
    assert 0 < errors[2] < errors[0] / 10
    silent = AdjointSequential(smooth_blocks(32), "euler")
    silent(x).sum().backward()
    assert silent.last_backward.reconstruction_error is None and silent.last_backward.steps == 32


@pytest.mark.parametrize("fallback", [False, True], ids=["no_fallback", "fallback"])
@pytest.mark.parametrize("size", [32, 8], ids=["sampled", "whole"])
def test_a_stage_with_a_head_measures_its_reconstruction_error_on_a_sample_that_agrees_with_the_whole(size, fallback, monkeypatch):
    """Behind an exact head the error is measured on every 4th row and column (x̂ is not held whole beside the
    head's recomputation). Same weights, same batch: the sample must agree with the whole state, and both must
    see a real error (trained-like large residuals). A state under 8×8 positions (4×4 here) is measured whole."""
    import timm

    import lightning_resode.adjoint.function as engine_function

    torch.manual_seed(0)
    blocks = list(timm.create_model("resnet26", pretrained=False, zero_init_last=False).layer2)
    x = torch.randn(4, 256, size, size, requires_grad=True)

    def error() -> float:
        stage = AdjointSequential(blocks, "euler", exact_head=1)
        stage.fallback = fallback
        stage(x).sum().backward()
        return stage.last_backward.reconstruction_error

    sampled = error()
    with monkeypatch.context() as patch:
        patch.setattr(engine_function, "ERROR_SAMPLE_STRIDE", 1)
        whole = error()
    assert whole > 1e-2, whole
    assert abs(sampled - whole) < (0.2 if size == 32 else 1e-5) * whole, (sampled, whole)
    if size == 32:
        assert sampled != whole  # the sample is one: the test can tell


def test_nested_adjoint_stages_are_refused_clearly():
    inner = AdjointSequential(smooth_blocks(2))
    outer = AdjointSequential([inner, *smooth_blocks(2, seed=1)], name="outer")
    with pytest.raises(AdjointError, match="outer: 0 is itself an adjoint stage"):
        outer(torch.randn(2, 8, dtype=torch.float64, requires_grad=True))


def test_a_block_replaced_after_construction_is_the_one_that_runs():
    stage = AdjointSequential(smooth_blocks(3))
    replacement = smooth_blocks(1, seed=7)[0]
    setattr(stage, "1", replacement)  # module surgery on a block, as done on an nn.Sequential
    assert stage[1] is replacement
    stage(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    assert replacement.linear.weight.grad is not None


@pytest.mark.parametrize("method", ["euler_fast", "block_fp16", "block", "checkpoint"])
def test_a_kept_tensor_modified_in_place_is_refused_not_used(method):
    """What a stage keeps is not an autograd saved tensor, so the engine checks its version itself."""
    stage = AdjointSequential(conv_blocks(4, channels=4), exact_head=1).configure(method=method)
    x = torch.randn(4, 4, 8, 8)
    out = stage(x.clone().requires_grad_())
    out.relu_()  # an in-place activation on the stage output: only the adjoint keeps the output
    if method == "euler_fast":
        with pytest.raises(AdjointError, match="stage output was modified in place"):
            out.sum().backward()
    else:
        out.sum().backward()
    x_in = x.clone().requires_grad_()
    h = x_in * 1.0
    out = stage(h)
    with torch.no_grad():
        h.add_(1.0)  # the stage input changed after the forward: every method keeps it (exact head)
    with pytest.raises(AdjointError, match="stage input was modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("value", [None, 1, 1.0, {"head": False}, b"head", ["stepz", 1], "heads", ["head_recompute"]])
def test_a_bad_lean_graphs_setting_names_itself_and_what_is_valid(value) -> None:
    stage = AdjointSequential([torch.nn.Identity()])
    with pytest.raises(ValueError, match="lean_graphs") as caught:
        stage.lean_graphs = value
    message = str(caught.value)
    assert "head" in message and (repr(value) in message or "unknown part" in message or "needs 'head'" in message), message
    assert stage.lean_graphs == {"head", "head_recompute", "steps"}  # unchanged


def test_a_non_finite_value_outside_the_error_sample_still_makes_the_error_nan():
    """The sampled error behind a head must not hide a -inf the sample skips (found by a new-user review)."""

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            poison = torch.zeros_like(y)
            poison[..., 1, 1] = float("-inf")  # row and column 1: not in the every-4th sample
            return y + poison

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + 0.1 * torch.tanh(self.conv(torch.nan_to_num(x, neginf=0.0))))

    for fallback in (False, True):
        torch.manual_seed(0)
        stage = AdjointSequential([Head(), Block(), Block(), Block()], "euler", exact_head=1, fallback=fallback)
        stage(torch.randn(2, 4, 16, 16, requires_grad=True)).sum().backward()
        report = stage.last_backward
        assert report.reconstruction_error != report.reconstruction_error, (fallback, report)  # NaN
        if fallback:
            assert report.fell_back and "not finite" in report.fallback_reason


@pytest.mark.parametrize("option", [{"anchor_every": 1.5}, {"anchor_every": 2.0}, {"refine": 0.5}, {"refine": True}])
def test_reconstruction_options_that_are_not_whole_numbers_are_refused_when_set(option):
    (name, value), = option.items()
    with pytest.raises(ValueError, match=f"{name} must be .*{value!r}"):
        AdjointSequential(smooth_blocks(2), "euler", **option)


def test_a_float16_stage_with_a_healthy_state_is_not_taken_for_diverged():
    """A float16 state's own float16 sum passes 65504 on healthy values (found by a new-user review: `.half()`
    training raised 'the training had already diverged'); the finiteness checks sum in float32."""
    import timm

    torch.manual_seed(0)
    blocks = [b.half() for b in timm.create_model("resnet18", pretrained=False, zero_init_last=False).layer2]
    x = (torch.rand(8, 64, 32, 32) * 2).half().requires_grad_()
    assert torch.isinf(x.sum())  # the test's premise: a float16 sum of this healthy state overflows
    stage = AdjointSequential(blocks, "euler_fast", exact_head=1)
    stage.fallback = True
    stage(x).float().sum().backward()
    assert not stage.last_backward.fell_back, stage.last_backward.fallback_reason
    assert bool(torch.isfinite(x.grad).all())
