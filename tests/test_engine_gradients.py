"""Gradients of adjoint stages against exact backprop (float64), and the forward's exactness."""

import numpy as np
import pytest
import torch

from lightning_resode import AdjointSequential
from stacks import smooth_blocks

DEPTHS = (8, 16, 32, 64, 128)


def _parameter_gradient(blocks, x, scheme, gradient, **options) -> torch.Tensor:
    stage = AdjointSequential(blocks, scheme, gradient=gradient, **options)
    stage.zero_grad(set_to_none=True)
    stage(x).pow(2).sum().backward()
    return torch.cat([p.grad.flatten() for p in stage.parameters()])


def _relative_gradient_error(depth: int, scheme: str, **options) -> float:
    blocks = smooth_blocks(depth)
    x = torch.randn(16, 8, dtype=torch.float64)
    exact = _parameter_gradient(blocks, x, scheme, "backprop")
    adjoint = _parameter_gradient(blocks, x, scheme, "adjoint", **options)
    return float((adjoint - exact).norm() / exact.norm())


def _fitted_slope(scheme: str) -> float:
    errors = [_relative_gradient_error(depth, scheme) for depth in DEPTHS]
    assert all(np.isfinite(errors))
    return float(np.polyfit(np.log(DEPTHS), np.log(errors), 1)[0])


@pytest.mark.parametrize("scheme", ["euler", "euler_fast"])
def test_euler_gradient_error_shrinks_like_one_over_depth(scheme):
    assert -1.3 < _fitted_slope(scheme) < -0.7


def test_heun_gradient_error_shrinks_at_least_like_depth_to_minus_one_and_a_half():
    assert _fitted_slope("heun") <= -1.5


@pytest.mark.parametrize("scheme", ["euler", "euler_fast", "heun"])
def test_adjoint_gradient_is_close_to_backprop_on_a_deep_smooth_stack(scheme):
    assert _relative_gradient_error(128, scheme) < 0.02


@pytest.mark.parametrize("scheme", ["euler", "euler_fast", "heun"])
def test_checkpoint_gradient_equals_backprop(scheme):
    blocks = smooth_blocks(16)
    x = torch.randn(4, 8, dtype=torch.float64)
    exact = _parameter_gradient(blocks, x, scheme, "backprop")
    torch.testing.assert_close(_parameter_gradient(blocks, x, scheme, "checkpoint"), exact, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scheme", ["euler", "euler_fast"])
def test_refinement_and_anchors_buy_accuracy(scheme):
    plain = _relative_gradient_error(32, scheme)
    refined_once = _relative_gradient_error(32, scheme, refine=1)
    refined_thrice = _relative_gradient_error(32, scheme, refine=3)
    anchored = _relative_gradient_error(32, scheme, anchor_every=4)
    assert refined_once < plain / 5
    assert refined_thrice < refined_once / 20
    assert anchored < plain / 3


@pytest.mark.parametrize("scheme", ["euler", "euler_fast"])
@pytest.mark.parametrize("depth", [3, 4], ids=["anchor_at_the_top", "no_anchor_at_the_top"])
def test_a_kept_top_step_with_anchors_only_ever_brings_the_gradient_closer(scheme, depth):
    """The kept top increment rebuilds the top step's input exactly (float64 here). Where the top step has an
    anchor it must not be used again further down: it was subtracted at the step below the anchor, doubling the
    gradient error of `to_adjoint(..., anchor_every=K)` (its default keeps a top step) where (S-1) % K == 0."""
    torch.manual_seed(1)
    plain = _relative_gradient_error(depth, scheme, anchor_every=2)
    torch.manual_seed(1)  # the same input
    with_top = _relative_gradient_error(depth, scheme, anchor_every=2, top_step_dtype=torch.float64)
    assert plain > 1e-4  # there is an error for the top step to remove or double
    assert with_top <= plain * (1 + 1e-9), (with_top, plain)


def test_input_gradient_matches_backprop():
    blocks = smooth_blocks(64)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    (exact,) = torch.autograd.grad(AdjointSequential(blocks, "heun", gradient="backprop")(x).sum(), x)
    (adjoint,) = torch.autograd.grad(AdjointSequential(blocks, "heun")(x).sum(), x)
    assert float((adjoint - exact).norm() / exact.norm()) < 1e-4


def test_euler_forward_is_the_plain_composition():
    blocks = smooth_blocks(24)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    expected = x
    for block in blocks:
        expected = block(expected)
    for scheme in ("euler", "euler_fast"):
        assert torch.equal(AdjointSequential(blocks, scheme).train()(x), expected)


def test_heun_forward_is_the_papers_scheme():
    blocks = smooth_blocks(12)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    state = x
    for n in range(len(blocks) - 1):  # N blocks -> N-1 steps, g_n(x) = b_n(x) - x
        g_n = blocks[n](state) - state
        y = state + g_n
        state = state + 0.5 * (g_n + (blocks[n + 1](y) - y))
    torch.testing.assert_close(AdjointSequential(blocks, "heun").train()(x), state, rtol=1e-14, atol=1e-14)


def test_backward_costs_match_the_documented_block_forward_counts():
    """euler_fast: one block forward per block, plus one for the top block, plus one for the block below it where
    the stage recomputes its steps with lean graphs (the top step then keeps no cache: one state less); heun too."""
    depth = 10
    x = torch.randn(2, 8, dtype=torch.float64)
    expected = {("euler", 0, True): 2 * depth, ("euler_fast", 0, True): depth + 2, ("euler_fast", 0, False): depth + 1,
                ("heun", 0, True): 3 * (depth - 1) + 2, ("heun", 0, False): 3 * (depth - 1) + 1,
                ("euler_fast", 2, True): depth + 2 + 2 * depth}
    for (scheme, refine, lean_steps), forwards in expected.items():
        stage = AdjointSequential(smooth_blocks(depth), scheme, refine=refine, lean_graphs=True if lean_steps else "head")
        stage(x).sum().backward()
        assert stage.last_backward.block_forwards == forwards, (scheme, refine, lean_steps)


def test_keeping_the_top_step_saves_its_block_forward_and_its_reverse_error():
    depth = 10
    x = torch.randn(8, 8, dtype=torch.float64)
    exact = _parameter_gradient(smooth_blocks(depth), x, "euler_fast", "backprop")
    errors = {}
    for dtype in (None, torch.bfloat16):
        stage = AdjointSequential(smooth_blocks(depth), "euler_fast", top_step_dtype=dtype)
        stage(x).pow(2).sum().backward()
        assert stage.last_backward.block_forwards == (depth + 1 if dtype else depth + 2)  # lean steps: see above
        grad = torch.cat([p.grad.flatten() for p in stage.parameters()])
        errors[dtype] = float((grad - exact).norm() / exact.norm())
    assert errors[torch.bfloat16] < errors[None]
    # one block: the kept increment is the whole reconstruction, exact up to bf16 rounding of the residual
    single = AdjointSequential(smooth_blocks(1), "euler", top_step_dtype=torch.bfloat16, keep_input=True)
    out = single(x)
    out.sum().backward()
    residual_ratio = float((out - x).norm() / x.norm())
    assert single.last_backward.reconstruction_error <= 2**-8 * residual_ratio  # bf16 unit roundoff of the step
    reversed_only = AdjointSequential(smooth_blocks(1), "euler", keep_input=True)
    reversed_only(x).sum().backward()
    assert reversed_only.last_backward.reconstruction_error > 10 * single.last_backward.reconstruction_error
