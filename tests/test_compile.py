"""torch.compile trains converted models with every method: the same gradients as eager, BatchNorm updated once.

What gets compiled: the stages' memory-free training forward runs eagerly (one graph break per stage: its
autograd nodes call autograd from their backward, which a compiled graph cannot hold), and so does the stem's
exact checkpoint; the rest (the head, and in eval the whole network) is compiled. The auto policy calibrates
eagerly at its first training step (its hook is excluded from compilation).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from lightning_resode import adjoint_stages, policy_of, to_adjoint

QUICK_METHODS = ("block_fp16", "euler_fast", "auto")
ALL_METHODS = (*QUICK_METHODS, "block", "block_bf16", "checkpoint")


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=5, channels=(8, 16, 16, 16), stem_width=8, zero_init_last=False)
    return to_adjoint(plain, scheme=method, check=False).train()


def _step(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def _check(method: str, backend: str) -> None:
    eager = _model(method)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the first step calibrates (auto) in both
        want, got = _step(eager, x), _step(compiled, x)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    counters = {int(m.num_batches_tracked) for m in compiled_model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert counters == {2}  # two training steps: each BatchNorm updated once per step, recomputation included
    for name, stage in adjoint_stages(compiled_model).items():
        assert stage.method == adjoint_stages(eager)[name].method
    if method == "auto":
        assert policy_of(compiled_model).decisions  # calibrated, eagerly
    torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m in QUICK_METHODS else pytest.mark.slow) for m in ALL_METHODS])
def test_compiled_training_equals_eager(method: str) -> None:
    _check(method, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL_METHODS)
def test_compiled_training_with_inductor_equals_eager(method: str) -> None:
    _check(method, "inductor")
