"""The autograd contracts users combine a converted model with, each checked against plain timm on the same weights.

``torch.func.functional_call`` (values that differ from the module's own), ``torch.func.grad`` / ``vjp``,
several backwards through one forward (``retain_graph=True``), ``torch.autograd.gradcheck``, and the saved-tensor
hooks (``saved_tensors_hooks``, ``save_on_cpu``) that see, offload or change what a stage keeps.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from torch.func import functional_call

from lightning_resode import adjoint_stages, saved_activation_bytes, to_adjoint

# timm's structure (stem, downsampling heads, post-activation ReLU), narrow so float64 stays quick
NARROW = dict(channels=(8, 16, 16, 16), stem_width=8)
EXACT = ("block", "checkpoint")
STORED = ("block", "block_fp16", "block_bf16", "checkpoint")


def _plain(dtype: torch.dtype = torch.float64) -> nn.Module:
    """A timm resnet18 whose residual branches are not zero (zero_init_last=False), in training mode."""
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=5, zero_init_last=False, **NARROW).to(dtype).train()


def _converted(plain: nn.Module, method: str) -> nn.Module:
    return to_adjoint(copy.deepcopy(plain), scheme=method, check=False).train()


def _images(dtype: torch.dtype = torch.float64, n: int = 8, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _other_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Leaf tensors for every parameter, with values that differ from the module's own."""
    gen = torch.Generator().manual_seed(2)
    return {
        k: (v.detach() * (1 + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype))).requires_grad_()
        for k, v in model.named_parameters()
    }


def _loss(out: torch.Tensor) -> torch.Tensor:
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out * weight).sum()


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa, fb = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(torch.nn.functional.cosine_similarity(fa, fb, dim=0))


@pytest.mark.parametrize("method", ["block", "checkpoint", "block_fp16", "euler_fast"])
def test_functional_call_gives_every_passed_tensor_its_gradient(method: str) -> None:
    """Model soups, MAML and torch.func trainers call the model with other tensors: the backward must use them."""
    plain = _plain()
    converted = _converted(plain, method)
    x = _images().requires_grad_()
    values = _other_values(plain)
    grads = torch.autograd.grad(_loss(functional_call(converted, values, (x,))), [x, *values.values()], allow_unused=True)
    assert sum(g is None for g in grads) == 0
    # the same tensors loaded into the converted model, called the ordinary way: the same method, the same function
    loaded = copy.deepcopy(converted)
    with torch.no_grad():
        for name, p in loaded.named_parameters():
            p.copy_(values[name])
    expected = torch.autograd.grad(_loss(loaded(x)), [x, *loaded.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    reference = torch.autograd.grad(_loss(functional_call(plain, values, (x,))), [x, *values.values()])
    if method in EXACT:
        for got, want in zip(grads, reference):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    elif method == "block_fp16":
        assert _cosine(list(grads), list(reference)) > 0.99
    # the module's own parameters were not touched by the call and got no gradient from it
    assert all(p.grad is None for p in converted.parameters())


def test_functional_call_with_non_leaf_values_back_propagates_into_them() -> None:
    """MAML's fast weights are computed from other tensors: the gradient flows on to those."""
    plain = _plain()
    converted = _converted(plain, "block")
    x = _images()
    base = {k: v.detach().clone().requires_grad_() for k, v in plain.named_parameters()}
    fast = {k: v * 0.9 for k, v in base.items()}  # non-leaf tensors
    got = torch.autograd.grad(_loss(functional_call(converted, fast, (x,))), list(base.values()))
    want = torch.autograd.grad(_loss(functional_call(plain, {k: v * 0.9 for k, v in base.items()}, (x,))), list(base.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("transform", ["grad", "vjp"])
def test_torch_func_transforms_give_plain_timms_gradient_and_say_what_runs(transform: str) -> None:
    plain = _plain()
    converted = _converted(plain, "block_fp16")
    x = _images()
    values = {k: v.detach().clone() for k, v in plain.named_parameters()}

    def loss_of(model: nn.Module):
        def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            # BatchNorm updates its buffers in place, which a transform allows only on tensors made inside it
            buffers = {k: v.clone() for k, v in plain.named_buffers()}
            return _loss(functional_call(model, (params, buffers), (x,)))

        return loss

    def run(model: nn.Module) -> dict[str, torch.Tensor]:
        if transform == "grad":
            return torch.func.grad(loss_of(model))(values)
        _, pullback = torch.func.vjp(loss_of(model), values)
        return pullback(torch.tensor(1.0, dtype=torch.float64))[0]

    want = run(plain)
    with pytest.warns(UserWarning, match="under a torch.func transform .* runs plain autograd: exact gradients"):
        got = run(converted)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", [*STORED, "euler_fast"])
def test_several_backwards_through_one_forward_accumulate_the_right_gradients(method: str) -> None:
    """retain_graph=True: two losses back-propagated separately after one forward (what gradcheck does too)."""
    plain = _plain()
    converted = _converted(plain, method)
    x = _images()
    out = converted(x)
    (_loss(out) + 0.0).backward(retain_graph=True)
    out.square().mean().backward()
    separate = [p.grad.clone() for p in converted.parameters()]
    converted.zero_grad()
    out = converted(x)
    (_loss(out) + out.square().mean()).backward()
    together = [p.grad for p in converted.parameters()]
    for a, b in zip(separate, together):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if method in EXACT:
        out = plain(x)
        (_loss(out) + out.square().mean()).backward()
        for a, p in zip(separate, plain.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", EXACT)
def test_gradcheck_passes_in_float64(method: str) -> None:
    plain = _plain()
    converted = _converted(plain, method)
    names = ["layer1.0.conv1.weight", "layer3.1.bn2.weight", "layer4.0.downsample.0.weight"]
    values = {k: v.detach().clone().requires_grad_() for k, v in converted.named_parameters() if k in names}
    x = _images(n=3, size=32).requires_grad_()

    def f(x: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
        return functional_call(converted, dict(zip(names, ws)), (x,), strict=False)

    assert torch.autograd.gradcheck(f, (x, *(values[n] for n in names)), fast_mode=True)


def test_what_a_stage_keeps_goes_through_the_saved_tensor_hooks() -> None:
    """A pack hook sees every byte a converted model keeps (the 16-bit block inputs included)."""
    plain = _plain(torch.float32)
    converted = _converted(plain, "block_fp16")
    x = _images(torch.float32, size=128)  # layer4 at 4×4: every stage stores 16-bit inputs (≥ 64 values per channel)
    half_precision_bytes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float16:
            half_precision_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        converted(x)
    residual_blocks = sum(len(s) - s.exact_head for s in adjoint_stages(converted).values())
    assert len(half_precision_bytes) == residual_blocks  # one 16-bit input per residual block, each seen once
    assert saved_activation_bytes(converted, lambda: converted(x)) < saved_activation_bytes(plain, lambda: plain(x)) / 2


@pytest.mark.parametrize("method", ["block_fp16", "euler_fast", "checkpoint"])
def test_save_on_cpu_offloads_what_stages_keep_and_gives_the_same_gradients(method: str) -> None:
    plain = _plain(torch.float32)
    converted = _converted(plain, method)
    x = _images(torch.float32)
    _loss(converted(x)).backward()
    expected = [p.grad.clone() for p in converted.parameters()]
    converted.zero_grad()
    with torch.autograd.graph.save_on_cpu():
        out = converted(x)
    _loss(out).backward()
    for p, want in zip(converted.parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)


def test_the_backward_reads_what_the_unpack_hook_returns() -> None:
    """A hook that changes the kept states (as a compression hook would) changes the gradient: nothing is read
    around autograd."""
    plain = _plain(torch.float32)
    converted = _converted(plain, "block")
    x = _images(torch.float32)
    _loss(converted(x)).backward()
    clean = torch.cat([p.grad.flatten() for p in converted.parameters()])
    converted.zero_grad()

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t + 0.05 * torch.randn_like(t) if t.dim() == 4 and t.dtype == torch.float32 else t

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        out = converted(x)
    _loss(out).backward()
    noisy = torch.cat([p.grad.flatten() for p in converted.parameters()])
    assert not torch.allclose(noisy, clean)


@pytest.mark.parametrize("method", ["block", "block_fp16", "checkpoint", "euler_fast"])
def test_weights_changed_in_place_before_the_backward_are_refused(method: str) -> None:
    """Plain autograd refuses a backward whose weights changed since the forward; recomputing with the new weights
    would silently differentiate another function."""
    plain = _plain(torch.float32)
    converted = _converted(plain, method)
    out = converted(_images(torch.float32))
    with torch.no_grad():
        converted.layer2[1].conv2.weight.mul_(0.5)  # e.g. an optimizer step before a second backward
    with pytest.raises(RuntimeError, match=r"stage layer2: 1 parameter tensor\(s\) were modified in place .*conv2.weight"):
        _loss(out).backward()
    out = converted(_images(torch.float32))
    with torch.no_grad():
        converted.conv1.weight.add_(0.1)  # the stem's exact checkpoint too
    with pytest.raises(RuntimeError, match=r"stage stem: .*modified in place"):
        _loss(out).backward()


@pytest.mark.parametrize("method", ["euler_fast", "block_fp16", "block"])
def test_a_non_finite_incoming_gradient_flows_through_as_in_plain_autograd(method: str) -> None:
    """A float16 GradScaler overflow sends inf down the network; the step must reach GradScaler (which skips it),
    not stop with an error."""
    plain = _plain(torch.float32)
    converted = _converted(plain, method)
    x = _images(torch.float32)
    for model in (plain, converted):
        out = model.forward_features(x)
        out.register_hook(lambda g: g * float("inf"))
        _loss(model.forward_head(out)).backward()
        assert not all(torch.isfinite(p.grad).all() for p in model.layer1.parameters())


@pytest.mark.parametrize("method", ["block", "checkpoint", "block_fp16", "euler_fast"])
def test_eval_between_forward_and_backward_keeps_the_forwards_graph(method: str) -> None:
    """Plain autograd differentiates the graph the forward built, whatever ``model.eval()`` does afterwards; a
    recomputation must do the same (in eval mode BatchNorm would normalise with running statistics instead)."""
    plain = _plain()
    x = _images()

    def grads(model: nn.Module, switch: bool) -> list[torch.Tensor]:
        model.train().zero_grad(set_to_none=True)
        loss = _loss(model(x))
        if switch:
            model.eval()
        loss.backward()
        assert model.training is not switch  # the user's mode is left as they set it
        return [p.grad.clone() for p in model.parameters()]

    reference = grads(copy.deepcopy(plain), switch=True)
    switched = grads(_converted(plain, method), switch=True)
    unswitched = grads(_converted(plain, method), switch=False)
    for a, b in zip(switched, unswitched):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # the same call, whatever the mode afterwards
    if method in EXACT:
        for a, b in zip(switched, reference):
            torch.testing.assert_close(a, b)
