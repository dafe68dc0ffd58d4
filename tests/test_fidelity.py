"""The fidelity reference (auto policy, GradientFidelity, diagnose): exact, at a training step's memory."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lightning_resode import to_adjoint
from lightning_resode.convert import adjoint_stages
from lightning_resode.fidelity import compare, exact_gradients, unique_params
from lightning_resode.measure import step_memory

SIZES = (8, 16)


def _slope_mib(peak_of) -> float:
    """Peak MiB per extra image between two batch sizes (fixed costs such as parameter gradients cancel)."""
    low, high = (peak_of(n) for n in SIZES)
    return (high - low) / (SIZES[1] - SIZES[0]) / 2**20


def _batches() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {n: (torch.randn(n, 3, 64, 64, generator=gen), torch.randint(0, 5, (n,), generator=gen)) for n in SIZES}


def _training_peak(model: nn.Module, batches):  # noqa: ANN001, ANN202
    def peak(n: int) -> int:
        images, targets = batches[n]
        model.zero_grad(set_to_none=True)
        return step_memory(lambda: F.cross_entropy(model(images), targets)).peak_bytes

    return peak


def test_the_reference_costs_a_block_step_not_a_backprop_step(trained_small) -> None:
    """A calibration or fidelity step is a training step: its reference must not peak like plain backprop."""
    base = trained_small("resnet50", False).model
    converted = to_adjoint(copy.deepcopy(base), scheme="block_fp16", check=False).train()
    stages = adjoint_stages(converted)
    batches = _batches()

    def reference_peak(n: int) -> int:
        images, targets = batches[n]
        return step_memory(lambda: sum(g.sum() for g in exact_gradients(converted, stages, images, targets).values()).requires_grad_()).peak_bytes

    reference = _slope_mib(reference_peak)
    block = _slope_mib(_training_peak(to_adjoint(copy.deepcopy(base), scheme="block", check=False).train(), batches))
    backprop = _slope_mib(_training_peak(copy.deepcopy(base).train(), batches))
    assert reference <= 1.1 * block, (reference, block)
    assert reference < 0.75 * backprop, (reference, backprop)


def test_the_reference_is_plain_autograds_gradient(trained_small) -> None:
    base = trained_small("resnet50", False).model
    converted = to_adjoint(copy.deepcopy(base), scheme="euler_fast", check=False).train()
    images, targets = _batches()[8]
    exact = exact_gradients(converted, adjoint_stages(converted), images, targets)
    plain = copy.deepcopy(base).train()
    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(F.cross_entropy(plain(images), targets), unique_params(plain))))
    by_id = {id(p): grads[n] for n, p in converted.named_parameters() if p.requires_grad}
    cosine, error = compare(by_id, exact, unique_params(converted))
    assert cosine > 1 - 1e-9 and error < 1e-4, (cosine, error)
    assert {s.method for s in adjoint_stages(converted).values()} == {"euler_fast"}  # restored afterwards


def test_compare_allocates_no_copy_of_the_gradients() -> None:
    params = [nn.Parameter(torch.zeros(1 << 20)) for _ in range(8)]  # 32 MiB of float32 gradients
    grads = {id(p): torch.randn(1 << 20) for p in params}
    exact = {id(p): g + 0.01 * torch.randn(1 << 20) for p, g in zip(params, grads.values())}
    result = step_memory(lambda: torch.tensor(compare(grads, exact, params)[0], requires_grad=True).sum())
    one_tensor_float64 = (1 << 20) * 8
    assert result.peak_bytes <= 3 * one_tensor_float64 + 1024  # float64 copies of one tensor at a time, not of all 8
    cosine, error = compare(grads, exact, params)
    g = torch.cat([grads[id(p)] for p in params]).double()
    e = torch.cat([exact[id(p)] for p in params]).double()
    assert abs(cosine - float(F.cosine_similarity(g, e, dim=0))) < 1e-12
    assert abs(error - float((g - e).norm() / e.norm())) < 1e-12
