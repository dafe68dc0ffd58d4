"""The peak of a training step, measured from the allocator (what users pay), not assumed."""

from __future__ import annotations

import torch
from torch import nn

from lightning_resode import AdjointSequential
from lightning_resode.measure import peak_per_image, step_memory, training_step_memory
from stacks import conv_blocks


def test_step_memory_sees_an_allocation_of_known_size() -> None:
    weight = torch.randn(256, 256, requires_grad=True)

    def loss() -> torch.Tensor:
        big = torch.randn(1024, 256) @ weight  # 1 MiB activation kept for backward
        return big.square().sum()

    result = step_memory(loss)
    assert result.backward_start_bytes >= 2**20  # the activation kept for backward
    assert result.peak_bytes >= result.backward_start_bytes


def test_peak_per_image_grows_with_depth_for_backprop_not_for_the_adjoint() -> None:
    def model(depth: int, **options) -> nn.Module:
        return nn.Sequential(AdjointSequential(conv_blocks(depth, channels=8), **options))

    images = lambda b: torch.randn(b, 8, 16, 16)  # noqa: E731
    backprop = [peak_per_image(model(d, gradient="backprop"), images).mib_per_image for d in (4, 16)]
    adjoint = [peak_per_image(model(d, scheme="euler_fast"), images).mib_per_image for d in (4, 16)]
    block = [peak_per_image(model(d, gradient="block", block_dtype=torch.float16), images).mib_per_image for d in (4, 16)]
    assert backprop[1] > 3 * backprop[0]  # every activation of 16 blocks vs 4
    assert adjoint[1] < 1.3 * adjoint[0]  # flat in depth: only the working set of one block
    assert adjoint[1] < block[1] < backprop[1]  # ordered by what each keeps


def test_training_step_memory_leaves_no_gradients_behind() -> None:
    model = nn.Sequential(AdjointSequential(conv_blocks(3, channels=4), scheme="euler_fast"))
    training_step_memory(model, torch.randn(2, 4, 8, 8))
    assert all(p.grad is None for p in model.parameters())
