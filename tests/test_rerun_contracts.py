"""The autograd contracts, on stages that really re-run: plain timm's gradients, whatever way the model is called.

``tests/test_autograd_contracts.py`` and ``tests/test_compile.py`` check these contracts on stages too shallow to
re-run; ``tests/test_engine_rerun.py`` checks re-runs on small stacks. Here the model is the trained resnet101
fixture (narrow, 32×32; its layer3 has 22 residual steps, so ``store_every="auto"`` keeps the first input of each
of four runs that shorten towards the top; ``store_every=2`` makes every stage re-run) with the exact ``block`` method, against plain timm on the same
weights, in float64 (float32 once): eager, ``torch.func.functional_call`` with other parameter values,
``torch.compile(backend="aot_eager")``, and two backwards through one forward. Each test also checks from the
stages' backward reports that the re-runs happened (the runs in the plan, one extra block forward per re-run step).
Finally ``block_fp16`` with re-runs: plain timm's gradient up to the 16-bit rounding of the stored inputs, and the
same gradient as storing every input.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_resode import adjoint_stages, to_adjoint
from lightning_resode.testing import PRETRAIN_CLASSES, digits_split

#: resnet101 small, layer3: 23 blocks, the first (downsampling) one an exact head → 22 steps; ``"auto"`` runs of the
#: exact method (a kept input costs one re-run input) and of float16 inputs (a kept float32 input costs two)
LAYER3_STEPS, AUTO_RUNS, AUTO_RUNS_FP16 = 22, (7, 6, 5, 4), (9, 7, 5, 1)


@pytest.fixture(scope="module")
def trained(trained_small) -> nn.Module:
    """Trained resnet101 without zero-init (large residual branches); tests take deep copies."""
    return trained_small("resnet101", False).model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits_split(PRETRAIN_CLASSES, 32).train_images[:16]


def _plain(trained: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(trained).to(dtype).train()


def _converted(trained: nn.Module, dtype: torch.dtype, store_every, method: str = "block") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_adjoint(copy.deepcopy(trained).to(dtype), scheme=method, check=False, store_every=store_every).train()


def _loss(out: torch.Tensor) -> torch.Tensor:
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out * weight).sum()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors]).double()


def _relative_error(got, want) -> float:
    got, want = _flat(got), _flat(want)
    return float((got - want).norm() / want.norm())


def _cosine(a, b) -> float:
    return float(F.cosine_similarity(_flat(a), _flat(b), dim=0))


def _assert_equal_gradients(got, want, names, dtype: torch.dtype) -> None:
    """Exact method: equal to plain timm up to floating-point rounding (per tensor in float64)."""
    got, want = list(got), list(want)
    assert len(got) == len(want) == len(names)
    assert all(g is not None for g in got), [n for n, g in zip(names, got) if g is None]
    if dtype == torch.float64:
        for n, g, w in zip(names, got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    else:
        assert _relative_error(got, want) < 1e-5
        assert _relative_error(got[:1], want[:1]) < 1e-5  # the input gradient on its own


def _expected_runs(name: str, steps: int, store_every) -> tuple[int, ...] | None:
    if store_every == "auto":
        return AUTO_RUNS if name == "layer3" else None  # the other stages have fewer than 9 steps
    if steps < 2:
        return None
    return tuple(min(store_every, steps - first) for first in range(0, steps, store_every))


def _reruns(runs: tuple[int, ...] | None) -> int:
    """Block forwards a backward adds: in each run, the steps above its kept input are re-run."""
    return 0 if not runs else sum(length - 1 for length in runs)


def _assert_reran(model: nn.Module, store_every, report=None) -> None:
    """Each stage's last backward kept each run's first input and re-ran the steps above it (layer3 at least)."""
    stages = adjoint_stages(model)
    assert set(stages) == {"layer1", "layer2", "layer3", "layer4"}
    for name, stage in stages.items():
        last = stage.last_backward if report is None else report[name]
        assert last is not None, name
        assert last.plan.method == "block", name
        runs = _expected_runs(name, last.steps, store_every)
        assert last.plan.run_lengths == runs, (name, last.plan.run_lengths)
        assert last.block_forwards == last.steps + _reruns(runs), (name, last.block_forwards)
    layer3 = stages["layer3"].last_backward if report is None else report["layer3"]
    assert layer3.steps == LAYER3_STEPS
    assert layer3.block_forwards > layer3.steps  # re-runs really happened


def _assert_same_batchnorm_state(got: nn.Module, want: nn.Module) -> None:
    """After one training step each, the running statistics (and batch counters) are plain timm's: updated once, by
    the forward; the re-runs touch none."""
    got_buffers = dict(got.named_buffers())
    for name, buffer in want.named_buffers():
        torch.testing.assert_close(got_buffers[name], buffer, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


CASES = [("auto", torch.float64), (2, torch.float64), ("auto", torch.float32)]


@pytest.mark.parametrize(("store_every", "dtype"), CASES, ids=["auto-f64", "k2-f64", "auto-f32"])
def test_eager_reruns_give_plain_timms_gradients(trained, images, store_every, dtype) -> None:
    plain, converted = _plain(trained, dtype), _converted(trained, dtype, store_every)
    x = images[:8].to(dtype)

    def grads(model: nn.Module) -> tuple[torch.Tensor, ...]:
        leaf = x.clone().requires_grad_()
        return torch.autograd.grad(_loss(model(leaf)), [leaf, *model.parameters()])

    want, got = grads(plain), grads(converted)
    _assert_reran(converted, store_every)
    _assert_equal_gradients(got, want, ["input", *dict(plain.named_parameters())], dtype)
    if dtype == torch.float64:
        _assert_same_batchnorm_state(converted, plain)


@pytest.mark.parametrize("store_every", ["auto", 2])
def test_functional_call_reruns_with_the_passed_tensors(trained, images, store_every) -> None:
    """The re-run must run the blocks with the tensors passed to functional_call, not the module's own."""
    plain, converted = _plain(trained, torch.float64), _converted(trained, torch.float64, store_every)
    x = images[:8].double().requires_grad_()
    gen = torch.Generator().manual_seed(2)
    values = {
        k: (v.detach() * (1 + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype))).requires_grad_()
        for k, v in plain.named_parameters()
    }
    got = torch.autograd.grad(_loss(functional_call(converted, values, (x,))), [x, *values.values()], allow_unused=True)
    _assert_reran(converted, store_every)
    want = torch.autograd.grad(_loss(functional_call(plain, values, (x,))), [x, *values.values()])
    _assert_equal_gradients(got, want, ["input", *values], torch.float64)
    assert all(p.grad is None for p in converted.parameters())  # the module's own tensors got nothing
    # the other values matter: the module's own weights give a clearly different gradient
    own = torch.autograd.grad(_loss(copy.deepcopy(plain)(x)), [x])
    assert _relative_error(own, want[:1]) > 1e-2
    _assert_same_batchnorm_state(converted, plain)


@pytest.mark.parametrize("store_every", ["auto", 2])
def test_compiled_reruns_give_plain_timms_gradients(trained, images, store_every) -> None:
    """torch.compile (aot_eager): the stages run eagerly behind graph breaks, and still re-run exactly."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # earlier compilations must not leave this one at the recompilation limit (silently eager)
    plain, converted = _plain(trained, torch.float64), _converted(trained, torch.float64, store_every)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(converted, backend=counter)
    x = images[:8].double()
    leaf = x.clone().requires_grad_()
    got = torch.autograd.grad(_loss(compiled(leaf)), [leaf, *converted.parameters()])
    assert counter.frame_count >= 1  # something was compiled
    _assert_reran(converted, store_every)
    leaf = x.clone().requires_grad_()
    want = torch.autograd.grad(_loss(plain(leaf)), [leaf, *plain.parameters()])
    _assert_equal_gradients(got, want, ["input", *dict(plain.named_parameters())], torch.float64)
    _assert_same_batchnorm_state(converted, plain)


@pytest.mark.parametrize("store_every", ["auto", 2])
def test_a_retained_graph_reruns_at_each_backward(trained, images, store_every) -> None:
    plain, converted = _plain(trained, torch.float64), _converted(trained, torch.float64, store_every)
    reports: list[tuple[str, object]] = []
    for name, stage in adjoint_stages(converted).items():
        stage.register_report_hook(lambda _stage, report, name=name: reports.append((name, report)))
    x = images[:8].double().requires_grad_()
    out = converted(x)
    first = torch.autograd.grad(_loss(out), [x, *converted.parameters()], retain_graph=True)
    second = torch.autograd.grad(_loss(out), [x, *converted.parameters()])
    assert len(reports) == 8  # each stage reported once per backward, and each backward re-ran
    _assert_reran(converted, store_every, dict(reports[:4]))
    _assert_reran(converted, store_every, dict(reports[4:]))
    names = ["input", *dict(plain.named_parameters())]
    for n, a, b in zip(names, second, first):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=lambda m, n=n: f"second backward, {n}: {m}")
    leaf = x.detach().clone().requires_grad_()
    want = torch.autograd.grad(_loss(plain(leaf)), [leaf, *plain.parameters()])
    _assert_equal_gradients(first, want, names, torch.float64)


#: (fixture, cosine against plain timm, cosine against storing every input). With zero-init (zil) the 16-bit inputs
#: cost next to nothing. Without it (nozil: the largest residual branches, a ReLU that clips), ``block_fp16`` itself
#: is at 0.9977-0.9987 against exact backprop on these 16 images, depending on the machine that trained the fixture
#: (0.9977 with and without re-runs on an AVX-512 EPYC's fixture): the bound against plain timm is the 16-bit
#: method's, with room for fixtures trained elsewhere; what re-running adds is held by the second bound. Re-running rounds every input it
#: recovers, the kept ones too, from a forward that goes on from the exact values: the steps' VJPs read what storing
#: every input gives them, up to the re-run's own float32 arithmetic (BatchNorm normalising with the forward's
#: statistics instead of computing them).
FP16_BOUNDS = [(True, 0.999, 0.99999), (False, 0.995, 0.99999)]


@pytest.mark.parametrize(("zero_init_last", "against_plain", "against_stored"), FP16_BOUNDS, ids=["zil", "nozil"])
def test_block_fp16_reruns_give_the_gradient_of_stored_inputs(trained_small, images, zero_init_last, against_plain, against_stored) -> None:
    """16 images at 32×32: layer3 (2×2) normalises 64 values per channel, enough for 16-bit inputs."""
    trained = trained_small("resnet101", zero_init_last).model
    x = images[:16]

    def gradient(model: nn.Module) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        _loss(model(x)).backward()
        return _flat(p.grad for p in model.parameters())

    exact = gradient(_plain(trained, torch.float32))
    rerun_model = _converted(trained, torch.float32, "auto", "block_fp16")
    rerun = gradient(rerun_model)
    layer3 = adjoint_stages(rerun_model)["layer3"].last_backward
    assert (layer3.plan.method, layer3.plan.reason, layer3.plan.run_lengths) == ("block_fp16", None, AUTO_RUNS_FP16)
    assert layer3.block_forwards == LAYER3_STEPS + _reruns(AUTO_RUNS_FP16)
    stored_model = _converted(trained, torch.float32, None, "block_fp16")
    stored = gradient(stored_model)
    layer3 = adjoint_stages(stored_model)["layer3"].last_backward
    assert (layer3.plan.method, layer3.plan.run_lengths, layer3.block_forwards) == ("block_fp16", None, LAYER3_STEPS)
    assert _cosine([rerun], [exact]) >= against_plain
    assert _cosine([rerun], [stored]) > against_stored
