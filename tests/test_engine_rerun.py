"""``store_every``: a ``block`` stage keeps the first input of each run of steps and re-runs the rest in backward.

What must hold: the gradient is the one storing every input gives (exact for ``block``, only the 16-bit rounding
for ``block_fp16``) on small stacks and on trained weights, what is kept at rest falls from S states to the kept
inputs, the re-run replays BatchNorm statistics and dropout draws of the forward, and several backwards through
one forward each re-run.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_resode import AdjointSequential, ReconstructionError, adjoint_stages, saved_activation_bytes, to_adjoint
from lightning_resode.adjoint.plan import resolve_run_lengths
from lightning_resode.testing import PRETRAIN_CLASSES, digits_split
from stacks import conv_blocks, cosine, flat_grad, relative_error


def _grads(stage: AdjointSequential, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    stage.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    stage(x).square().sum().backward()
    return flat_grad(stage.parameters()), x.grad


@pytest.mark.parametrize("every", [2, 3, 5, 11, 40, "auto"])
def test_exact_block_with_reruns_equals_backprop(every) -> None:
    blocks = [b.double() for b in conv_blocks(12, channels=4, scale=1.0, dropout=0.2)]
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    exact_p, exact_x = _grads(AdjointSequential(copy.deepcopy(blocks), gradient="backprop"), x)
    stage = AdjointSequential(copy.deepcopy(blocks)).configure(method="block", store_every=every)
    p, gx = _grads(stage, x)
    torch.testing.assert_close(p, exact_p, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, exact_x, rtol=1e-10, atol=1e-12)
    runs = stage.last_backward.plan.run_lengths
    assert sum(runs) == 12
    if every != "auto":  # runs of K steps; a K beyond the stage is one run
        assert runs == tuple(min(every, 12 - first) for first in range(0, 12, every))
    # every step's VJP re-runs its block once; each run re-runs its steps above the kept input
    assert stage.last_backward.block_forwards == 12 + sum(length - 1 for length in runs)


def _held(runs: tuple[int, ...], kept_cost: int) -> int:
    """States live while the backward re-runs its worst run: the kept inputs below it and the run's inputs."""
    return max(kept_cost * i + length for i, length in enumerate(runs))


def _compositions(total: int):
    """Every way to split ``total`` steps into runs, bottom first."""
    if total == 0:
        yield ()
        return
    for first in range(1, total + 1):
        for rest in _compositions(total - first):
            yield (first, *rest)


@pytest.mark.parametrize("kept_cost", [1, 2])
def test_auto_runs_hold_the_least_any_split_of_the_steps_can(kept_cost) -> None:
    """Every split of 9-13 steps is tried: none holds fewer states during the backward than auto's, and none that
    holds as few keeps fewer inputs at rest."""
    for steps in range(9, 14):
        runs = resolve_run_lengths("auto", "block", steps, kept_cost)
        assert sum(runs) == steps and min(runs) >= 1
        best = min((_held(split, kept_cost), len(split)) for split in _compositions(steps))
        assert (_held(runs, kept_cost), len(runs)) == best, (steps, runs)


def test_auto_runs_of_a_deep_stage_hold_less_than_equal_runs() -> None:
    """resnet200's layer2 (23 steps) with float16 re-run inputs: runs of sqrt(2S) = 7 steps held 11 states (the kept
    float32 inputs count two), the shortening runs hold 9 and keep no more inputs at rest."""
    equal = tuple(min(7, 23 - first) for first in range(0, 23, 7))
    runs = resolve_run_lengths("auto", "block", 23, kept_cost=2)
    assert _held(equal, 2) == 11
    assert _held(runs, 2) == 9 and len(runs) <= len(equal)
    assert list(runs) == sorted(runs, reverse=True)  # the runs shorten towards the top


def test_auto_keeps_every_input_of_shallow_stages() -> None:
    x = torch.randn(2, 4, 6, 6)
    for depth, reruns in [(8, False), (9, True), (35, True)]:
        stage = AdjointSequential([b.float() for b in conv_blocks(depth, channels=4)]).configure(method="block_fp16")
        stage(x.clone().requires_grad_()).sum().backward()
        runs = stage.last_backward.plan.run_lengths
        assert (runs is not None) == reruns, depth
        assert runs is None or sum(runs) == depth, (depth, runs)


def test_what_is_kept_at_rest_is_the_kept_inputs_only() -> None:
    x = torch.randn(4, 4, 32, 32, requires_grad=True)
    state = x.numel() * 4

    def saved(method: str, every) -> int:
        stage = AdjointSequential([b.float() for b in conv_blocks(16, channels=4)]).configure(method=method, store_every=every)
        return saved_activation_bytes(stage, lambda: stage(x))

    statistics = saved("block", None) - 16 * state  # the BatchNorm statistics each step keeps (per channel: tiny)
    assert 0 <= statistics < 0.05 * state
    # K = 4: the exact inputs of steps 0, 4, 8, 12 (step 0's is the stage input itself, kept either way)
    assert saved("block", 4) == pytest.approx(4 * state + statistics, rel=0.02)
    assert saved("block_fp16", 4) == pytest.approx(4 * state + statistics, rel=0.02)
    assert saved("block_fp16", None) == pytest.approx(0.5 * 16 * state + statistics, rel=0.02)


def test_the_backward_holds_one_runs_inputs_at_most() -> None:
    from lightning_resode.measure import step_memory

    torch.manual_seed(0)
    blocks = conv_blocks(16, channels=16, scale=0.1)
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    weight = torch.randn_like(x)
    state = x.numel() * x.element_size()
    stage = AdjointSequential(blocks).configure(method="block_fp16", store_every=4)
    (stage(x) * weight).sum().backward()  # warm-up
    stage.zero_grad(set_to_none=True)
    chained = step_memory(lambda: (stage(x) * weight).sum())
    stage.zero_grad(set_to_none=True)
    one_block = step_memory(lambda: (blocks[0](x) * weight).sum())
    working_set = chained.peak_bytes - chained.backward_start_bytes
    # a run's three re-run inputs in float16 (1.5 S) and the float32 state being re-run (1 S) on top of one block
    assert working_set <= one_block.peak_bytes + 2.6 * state, (working_set / state, one_block.peak_bytes / state)


def test_a_retained_graph_reruns_at_each_backward() -> None:
    blocks = [b.double() for b in conv_blocks(10, channels=4, scale=1.0)]
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    stage = AdjointSequential(copy.deepcopy(blocks)).configure(method="block", store_every=3)
    out = stage(x.clone().requires_grad_())
    first = torch.autograd.grad(out.square().sum(), list(stage.parameters()), retain_graph=True)
    second = torch.autograd.grad(out.sum(), list(stage.parameters()))
    reference = AdjointSequential(copy.deepcopy(blocks), gradient="backprop")
    ref_out = reference(x.clone().requires_grad_())
    ref_first = torch.autograd.grad(ref_out.square().sum(), list(reference.parameters()), retain_graph=True)
    ref_second = torch.autograd.grad(ref_out.sum(), list(reference.parameters()))
    for got, want in [(first, ref_first), (second, ref_second)]:
        torch.testing.assert_close(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want]))


def test_an_input_that_overflows_float16_is_caught_though_stored_only_in_backward() -> None:
    stage = AdjointSequential([b.float() for b in conv_blocks(6, channels=4)], name="layer3").configure(method="block_fp16", store_every=3)
    x = torch.full((2, 4, 6, 6), 1e6, requires_grad=True)
    with pytest.raises(ReconstructionError, match=r"layer3: a block input does not fit torch.float16"):
        stage(x).sum().backward()


@pytest.mark.parametrize("bad", [0, -2, 2.5, "sometimes", True])
def test_a_bad_store_every_is_refused_with_its_value(bad) -> None:
    with pytest.raises(ValueError, match=r"store_every must be a positive number of steps, 'auto' or None, got"):
        AdjointSequential([b.float() for b in conv_blocks(3, channels=4)]).configure(method="block", store_every=bad)


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = digits_split(PRETRAIN_CLASSES, 32)
    return data.train_images[:16], data.train_labels[:16]


@pytest.mark.parametrize("zero_init_last", [False, True], ids=["nozil", "zil"])
def test_trained_resnet101_reruns_give_the_gradient_of_stored_inputs(trained_small, digits_batch, zero_init_last) -> None:
    """On trained weights (layer3: 22 steps, four runs by default) the re-run changes nothing the user can see."""
    trained = trained_small("resnet101", zero_init_last).model

    def gradient(model: torch.nn.Module) -> torch.Tensor:
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(digits_batch[0]), digits_batch[1]).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    exact = gradient(copy.deepcopy(trained))
    results = {}
    for method in ("block", "block_fp16"):
        for every in ("auto", None):
            model = copy.deepcopy(trained)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                to_adjoint(model, scheme=method, check=False)
            for stage in adjoint_stages(model).values():
                stage.configure(store_every=every)
            results[method, every] = gradient(model)
            if every == "auto":
                assert len(adjoint_stages(model)["layer3"].last_backward.plan.run_lengths) == 4
    # float32: storing every input is exact to ~1e-6 of the gradient's norm; re-running must be as good
    assert relative_error(results["block", "auto"], exact) < 1e-5
    assert relative_error(results["block", None], exact) < 1e-5
    assert cosine(results["block_fp16", "auto"], results["block_fp16", None]) > 0.9999
    assert cosine(results["block_fp16", "auto"], exact) > 0.99


def test_reruns_leave_batchnorm_running_statistics_as_backprop_does() -> None:
    blocks = [b.double() for b in conv_blocks(9, channels=4, scale=0.5)]
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    reference = AdjointSequential(copy.deepcopy(blocks), gradient="backprop")
    stage = AdjointSequential(copy.deepcopy(blocks)).configure(method="block_fp16", store_every=3)
    _grads(reference, x)
    _grads(stage, x)
    assert stage.last_backward.plan.run_lengths == (3, 3, 3)
    for (name, a), b in zip(reference.state_dict().items(), stage.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
