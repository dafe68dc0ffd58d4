"""BatchNorm in training mode: recomputation replays the forward's statistics; running stats move once."""

import copy

import pytest
import torch
from torch import nn

from lightning_resode import AdjointSequential
from stacks import conv_blocks, cosine

CONFIGS = [
    dict(scheme="euler"),
    dict(scheme="euler_fast", refine=1),
    dict(scheme="heun"),
    dict(scheme="euler", anchor_every=2),
    dict(scheme="euler", gradient="checkpoint"),
    dict(scheme="euler_fast", exact_head=1),
]


def _bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_running_statistics_after_a_step_equal_backprops(options):
    blocks = conv_blocks(6, channels=4)
    reference_blocks = copy.deepcopy(blocks)
    x = torch.randn(8, 4, 8, 8)
    scheme = options["scheme"]
    reference = AdjointSequential(reference_blocks, scheme, gradient="backprop")
    reference(x.requires_grad_()).square().mean().backward()
    stage = AdjointSequential(blocks, **options)
    stage(x).square().mean().backward()
    expected, got = _bn_state(reference), _bn_state(stage)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7, msg=key)
    assert int(got["0.bn1.num_batches_tracked"]) == 1


def test_reconstruction_normalises_with_the_forwards_statistics():
    """One block b(x) = x + BN(x): Euler's reverse is 2 x_1 - b(x_1), with BN using the statistics of x_0."""
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.3, 0.2]))
        bn.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            return x + 0.1 * self.bn(x)

    x0 = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 1
    stage = AdjointSequential([Block()], "euler", keep_input=True)
    x1 = stage(x0.clone().requires_grad_())
    x1.sum().backward()

    def reverse_with_stats_of(x_stats: torch.Tensor) -> torch.Tensor:
        mean = x_stats.mean(dim=(0, 2, 3), keepdim=True)
        var = x_stats.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        normalised = (x1.detach() - mean) / torch.sqrt(var + bn.eps)
        return x1.detach() - 0.1 * (normalised * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))

    def error(estimate):
        return float((estimate.detach() - x0).norm() / x0.norm())

    expected = error(reverse_with_stats_of(x0))
    with_fresh_statistics = error(reverse_with_stats_of(x1.detach()))
    assert abs(stage.last_backward.reconstruction_error - expected) < 1e-12
    assert abs(with_fresh_statistics - expected) > 1e-3  # the test can tell the two apart


def test_gradients_through_batchnorm_match_backprop():
    """The replayed BatchNorm must differentiate through the batch statistics like training-mode BatchNorm."""
    blocks = conv_blocks(8, channels=4)
    for block in blocks:
        block.double()
    x = torch.randn(8, 4, 8, 8, dtype=torch.float64, requires_grad=True)

    def gradient(**options):
        stage = AdjointSequential(copy.deepcopy(blocks), **options)
        out = stage(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return torch.cat([p.grad.flatten() for p in stage.parameters()])

    exact = gradient(gradient="backprop")
    torch.testing.assert_close(gradient(gradient="checkpoint"), exact, rtol=1e-10, atol=1e-12)
    # refined to convergence, the reconstruction is exact and so must be the gradient through the statistics
    refined = gradient(scheme="euler", refine=30)
    assert float((refined - exact).norm() / exact.norm()) < 1e-10
    assert cosine(gradient(scheme="euler_fast", refine=3), exact) > 0.9999


def test_timm_checkpointing_double_counts_but_we_do_not():
    """The peer bug: recomputation through nn.BatchNorm bumps running stats a second time."""
    from torch.utils.checkpoint import checkpoint

    blocks = conv_blocks(2, channels=4)
    x = torch.randn(8, 4, 8, 8, requires_grad=True)
    peer = copy.deepcopy(blocks)
    h = x
    for block in peer:
        h = checkpoint(block, h, use_reentrant=False)
    h.sum().backward()
    assert int(peer[0].bn1.num_batches_tracked) == 2  # the peer's double update

    stage = AdjointSequential(blocks, "euler", gradient="checkpoint")
    stage(x).sum().backward()
    assert int(blocks[0].bn1.num_batches_tracked) == 1


def test_channels_last_gradients_through_batchnorm_match_backprop():
    blocks = [b.double().to(memory_format=torch.channels_last) for b in conv_blocks(4, channels=4)]
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()

    def gradient(**options):
        stage = AdjointSequential(copy.deepcopy(blocks), **options)
        stage(x).square().sum().backward()
        return torch.cat([p.grad.flatten() for p in stage.parameters()])

    exact = gradient(gradient="backprop")
    assert float((gradient(scheme="euler", refine=30) - exact).norm() / exact.norm()) < 1e-10


@pytest.mark.parametrize(
    "shape, channels_last, affine",
    [((6, 5, 7, 3), False, True), ((6, 5, 7, 3), True, True), ((6, 5, 7, 3), False, False), ((9, 4), False, True), ((4, 3, 11), False, True)],
    ids=["nchw", "channels_last", "no-affine", "1d-flat", "1d-seq"],
)
def test_replayed_batchnorm_gradient_equals_training_mode_autograd(shape, channels_last, affine):
    """The VJP's BatchNorm (forward statistics, gradient through them) is training-mode BatchNorm's, exactly."""
    from lightning_resode.adjoint.replay import _batch_norm_with_substituted_stats

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    dims = [0, *range(2, x.dim())]
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    grad_out = torch.randn_like(x)
    inputs = [x.clone().requires_grad_()] + ([weight, bias] if affine else [])
    expected = torch.autograd.grad(
        torch.nn.functional.batch_norm(inputs[0], None, None, weight, bias, True, 0.0, 1e-5), inputs, grad_out
    )
    inputs = [x.clone().requires_grad_()] + ([weight, bias] if affine else [])
    got = torch.autograd.grad(_batch_norm_with_substituted_stats(inputs[0], mean, var, weight, bias, 1e-5), inputs, grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
