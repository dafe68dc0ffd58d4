"""Per-block checkpoints (scheme 'block', 'block_fp16', 'block_bf16'): exact or only the input's rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_resode import AdjointSequential, ReconstructionError, saved_activation_bytes
from stacks import conv_blocks, cosine, flat_grad, relative_error


def _grads(stage: AdjointSequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    stage(x).square().sum().backward()
    return flat_grad(stage.parameters()), x.grad


def _large_residual_blocks(depth: int) -> list:
    # scale 1: residual branches as large as the state (normally trained weights), where reconstruction fails
    return [b.double() for b in conv_blocks(depth, channels=4, scale=1.0)]


def test_exact_block_checkpoint_equals_backprop_on_large_residuals() -> None:
    blocks = _large_residual_blocks(12)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    exact_p, exact_x = _grads(AdjointSequential(copy.deepcopy(blocks), gradient="backprop"), x)
    block_p, block_x = _grads(AdjointSequential(copy.deepcopy(blocks)).configure(method="block"), x)
    torch.testing.assert_close(block_p, exact_p, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block_x, exact_x, rtol=1e-10, atol=1e-12)
    # where a reconstruction is far off on the same weights
    adjoint_p, _ = _grads(AdjointSequential(copy.deepcopy(blocks), "euler_fast"), x)
    assert relative_error(adjoint_p, exact_p) > 0.1


@pytest.mark.parametrize("method, rounding", [("block_fp16", 2.0**-11), ("block_bf16", 2.0**-8)])
def test_compressed_block_inputs_cost_only_their_rounding(method: str, rounding: float) -> None:
    blocks = [b.float() for b in conv_blocks(16, channels=4, scale=1.0)]
    x = torch.randn(4, 4, 6, 6)
    exact_p, _ = _grads(AdjointSequential(copy.deepcopy(blocks), gradient="backprop"), x)
    approx_p, _ = _grads(AdjointSequential(copy.deepcopy(blocks)).configure(method=method), x)
    error = relative_error(approx_p, exact_p)
    assert error < 50 * rounding  # a few roundings, not an error that grows with depth
    assert error > 0  # and it is not silently exact (the inputs really were stored compressed)
    assert cosine(approx_p, exact_p) > 0.999


def test_compressed_inputs_are_half_the_bytes_and_grow_with_depth() -> None:
    x = torch.randn(4, 4, 8, 8, requires_grad=True)

    def saved(method: str, depth: int) -> int:
        stage = AdjointSequential([b.float() for b in conv_blocks(depth, channels=4)]).configure(method=method, store_every=None)
        return saved_activation_bytes(stage, lambda: stage(x))

    state = x.numel() * 4
    assert saved("block", 16) - saved("block", 8) == pytest.approx(8 * state, rel=0.05)
    assert saved("block_fp16", 16) - saved("block_fp16", 8) == pytest.approx(8 * state / 2, rel=0.05)


def test_batchnorm_running_statistics_move_once_like_backprop() -> None:
    blocks = [b.double() for b in conv_blocks(6, channels=4, scale=0.5)]
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    reference = AdjointSequential(copy.deepcopy(blocks), gradient="backprop")
    stage = AdjointSequential(copy.deepcopy(blocks)).configure(method="block_fp16")
    _grads(reference, x)
    _grads(stage, x)
    for (name, a), b in zip(reference.state_dict().items(), stage.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_float16_overflow_is_named_with_the_method_that_fits() -> None:
    blocks = [b.float() for b in conv_blocks(4, channels=4)]
    stage = AdjointSequential(blocks, name="layer2").configure(method="block_fp16")
    x = torch.full((2, 4, 6, 6), 1e6, requires_grad=True)  # beyond float16's range (65504)
    with pytest.raises(ReconstructionError, match=r"layer2: a block input does not fit torch.float16 \(overflow\).*block_bf16"):
        stage(x).sum().backward()
    assert all(p.grad is None for p in stage.parameters())


def test_with_fallback_an_overflow_gives_the_exact_gradient_and_tells_the_policy() -> None:
    """What the auto policy relies on: it must never raise; it gets the exact gradient and measures again."""
    blocks = [b.double() for b in conv_blocks(4, channels=4, scale=0.5)]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64) * 1e5  # beyond float16's range somewhere
    exact_p, exact_x = _grads(AdjointSequential(copy.deepcopy(blocks), exact_head=1).configure(method="block"), x)
    stage = AdjointSequential(copy.deepcopy(blocks), exact_head=1).configure(method="block_fp16")
    stage.fallback = True
    told: list[str] = []
    stage.register_report_hook(lambda s, report: told.append(report.fallback_reason) if report.fell_back else None)
    got_p, got_x = _grads(stage, x)
    torch.testing.assert_close(got_p, exact_p, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_x, exact_x, rtol=1e-9, atol=1e-9)
    assert told == ["a block input does not fit torch.float16 (overflow)"] and stage.last_backward.fell_back


@pytest.mark.parametrize("fallback", [False, True])
def test_a_non_finite_input_is_named_as_divergence_not_as_overflow(fallback: bool) -> None:
    stage = AdjointSequential([b.float() for b in conv_blocks(4, channels=4)], exact_head=1, name="layer3").configure(method="block_fp16")
    stage.fallback = fallback
    x = torch.randn(2, 4, 6, 6)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ReconstructionError, match=r"layer3: the stage's input .* is not finite, so the training had already diverged"):
        stage(x.requires_grad_()).sum().backward()
    assert all(p.grad is None for p in stage.parameters())


@pytest.mark.parametrize("method", ["block_fp16", "euler_fast"])
def test_few_values_per_batchnorm_channel_keep_inputs_exact(method: str) -> None:
    """Two images at 1×1: BatchNorm's batch variance can be tiny and would divide an approximate input's error
    (16-bit rounding, a reconstruction's) up to O(1); there the engine stores the (tiny) state exactly."""
    torch.manual_seed(0)
    blocks = [b.float() for b in conv_blocks(6, channels=8, scale=1.0)]
    exact = AdjointSequential(copy.deepcopy(blocks)).configure(method="block")
    compressed = AdjointSequential(copy.deepcopy(blocks)).configure(method=method)
    tiny = torch.randn(2, 8, 1, 1)
    assert saved_activation_bytes(compressed, lambda: compressed(tiny.requires_grad_())) == saved_activation_bytes(exact, lambda: exact(tiny))
    torch.testing.assert_close(_grads(compressed, tiny)[0], _grads(exact, tiny)[0], rtol=0, atol=0)
    assert compressed.last_backward.gradient == "block"
    large = torch.randn(16, 8, 4, 4)  # 256 values per channel: the method itself
    assert saved_activation_bytes(compressed, lambda: compressed(large)) < 0.6 * saved_activation_bytes(exact, lambda: exact(large))


def test_method_names_round_trip_and_bad_names_say_what_is_valid() -> None:
    stage = AdjointSequential(conv_blocks(3))
    for method in ("euler_fast", "euler", "block_fp16", "block_bf16", "block", "checkpoint", "backprop"):
        assert stage.configure(method=method).method == method
    with pytest.raises(ValueError, match=r"unknown scheme 'block8'; valid: \['euler_fast'"):
        stage.configure(method="block8")
