"""Parameters and inputs: tied weights, frozen weights, inputs without grad, several stages, accumulation, eval."""

import copy

import torch
from torch import nn

from lightning_resode import AdjointSequential
from lightning_resode.adjoint.function import StageCheckpoint, StageExit
from lightning_resode.ode_models import OdeResidualBlock
from stacks import smooth_blocks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_weights_tied_across_depth_accumulate_like_backprop():
    shared = OdeResidualBlock(8, step_size=1 / 32).double()
    blocks = [shared] * 32  # the paper's tied-weights network: one block object, 32 times
    x = torch.randn(8, 8, dtype=torch.float64)
    for scheme in ("euler", "heun"):
        shared.zero_grad()
        AdjointSequential(blocks, scheme, gradient="backprop")(x).square().sum().backward()
        exact = shared.linear.weight.grad.clone()
        shared.zero_grad()
        stage = AdjointSequential(blocks, scheme)
        assert len(list(stage.parameters())) == 2  # registered once per object, like nn.Sequential
        stage(x).square().sum().backward()
        assert _rel(shared.linear.weight.grad, exact) < (0.02 if scheme == "euler" else 1e-3)


def test_frozen_parameters_get_no_gradient_and_inputs_without_grad_work():
    blocks = smooth_blocks(12)
    for block in blocks[:6]:
        block.requires_grad_(False)
    x = torch.randn(4, 8, dtype=torch.float64)  # no requires_grad
    stage = AdjointSequential(blocks, "euler_fast")
    stage(x).sum().backward()
    assert all(p.grad is None for block in blocks[:6] for p in block.parameters())
    assert all(p.grad is not None for block in blocks[6:] for p in block.parameters())
    reference = copy.deepcopy(blocks)
    AdjointSequential(reference, gradient="backprop")(x).sum().backward()
    assert _rel(blocks[-1].linear.weight.grad, reference[-1].linear.weight.grad) < 0.05


def test_all_frozen_and_no_input_grad_runs_the_plain_forward():
    blocks = smooth_blocks(4)
    for block in blocks:
        block.requires_grad_(False)
    out = AdjointSequential(blocks)(torch.randn(2, 8, dtype=torch.float64))
    assert out.grad_fn is None


def test_several_stages_in_one_model():
    class TwoStages(nn.Module):
        def __init__(self, gradient: str) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.first = AdjointSequential(smooth_blocks(32, seed=1), "heun", gradient=gradient)
            self.mix = nn.Linear(8, 8).double()
            self.second = AdjointSequential(smooth_blocks(32, seed=2), "heun", gradient=gradient)

        def forward(self, x):
            return self.second(torch.tanh(self.mix(self.first(x))))

    x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    exact_model, adjoint_model = TwoStages("backprop"), TwoStages("adjoint")
    exact_model(x).square().sum().backward()
    exact_input_grad = x.grad.clone()
    x.grad = None
    adjoint_model(x).square().sum().backward()
    for (name, p_exact), (_, p_adjoint) in zip(exact_model.named_parameters(), adjoint_model.named_parameters()):
        assert _rel(p_adjoint.grad, p_exact.grad) < 1e-3, name
    assert _rel(x.grad, exact_input_grad) < 1e-3


def test_gradient_accumulation_over_micro_batches_equals_the_full_batch():
    blocks = smooth_blocks(16)
    stage = AdjointSequential(blocks, "euler", gradient="checkpoint")
    x = torch.randn(8, 8, dtype=torch.float64)
    stage(x).square().sum().backward()
    full = [p.grad.clone() for p in stage.parameters()]
    stage.zero_grad()
    for chunk in x.chunk(4):
        stage(chunk).square().sum().backward()
    for g_full, p in zip(full, stage.parameters()):
        torch.testing.assert_close(p.grad, g_full)
    adjoint = AdjointSequential(blocks, "heun")
    adjoint.zero_grad()
    for chunk in x.chunk(4):
        adjoint(chunk).square().sum().backward()
    accumulated = torch.cat([p.grad.flatten() for p in adjoint.parameters()])
    adjoint.zero_grad()
    adjoint(x).square().sum().backward()
    torch.testing.assert_close(accumulated, torch.cat([p.grad.flatten() for p in adjoint.parameters()]))


def _uses_adjoint_function(out: torch.Tensor) -> bool:
    engine = (StageCheckpoint.__name__, StageExit.__name__)
    return out.grad_fn is not None and any(name in type(out.grad_fn).__name__ for name in engine)


def test_eval_and_no_grad_run_the_plain_forward():
    stage = AdjointSequential(smooth_blocks(8), "euler")
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert _uses_adjoint_function(stage.train()(x))
    assert not _uses_adjoint_function(stage.eval()(x))  # eval keeps plain autograd (e.g. input saliency)
    with torch.no_grad():
        out = stage.train()(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, stage.eval()(x).detach(), rtol=0, atol=0)
