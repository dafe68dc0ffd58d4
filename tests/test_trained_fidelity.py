"""Adjoint gradients against exact ones on *trained* weights: a small timm ResNet fitted to scikit-learn's digits.

Run with ``-s`` to see the figures (they are quoted in docs/convert.md).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lightning_resode import adjoint_stages, to_adjoint

NARROW = dict(channels=(64, 32, 64, 128), num_classes=10)  # layer1 keeps the stem width: 2 residual blocks


@pytest.fixture(scope="module")
def trained_digits_resnet():
    """A narrow timm resnet18 trained briefly on 8x8 digits upscaled to 32x32 RGB (ships with scikit-learn)."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = (F.interpolate(images, size=32, mode="bilinear").repeat(1, 3, 1, 1) - 0.3) / 0.4
    labels = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, **NARROW)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    train, held_out = slice(0, 1500), slice(1500, None)
    for _ in range(80):
        idx = torch.randint(0, 1500, (32,), generator=gen)
        loss = F.cross_entropy(model(images[train][idx]), labels[train][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[held_out]).argmax(1) == labels[held_out]).float().mean())
    return model, (images[:32], labels[:32]), accuracy


def _gradient(model, batch) -> torch.Tensor:
    model.train()
    model.zero_grad()
    torch.manual_seed(0)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def test_adjoint_gradients_on_trained_weights(trained_digits_resnet) -> None:
    trained, batch, accuracy = trained_digits_resnet
    assert accuracy > 0.8, f"the model did not learn digits (held-out accuracy {accuracy:.3f})"
    exact = _gradient(copy.deepcopy(trained), batch)
    figures = {}
    for scheme in ("euler_fast", "euler", "checkpoint", "auto"):
        model = copy.deepcopy(trained)
        to_adjoint(model, scheme=scheme, calibration=batch if scheme == "auto" else None, min_cosine=0.99)
        grad = _gradient(model, batch)
        figures[scheme] = (float(F.cosine_similarity(grad, exact, dim=0)), float((grad - exact).norm() / exact.norm()))
        if scheme == "auto":
            figures["auto choice"] = {n: s.scheme if s.gradient == "adjoint" else s.gradient for n, s in adjoint_stages(model).items()}
    print(f"\ndigits resnet18 (narrow), held-out accuracy {accuracy:.3f}; gradient vs exact backprop (cosine, rel. error):")
    for key, value in figures.items():
        print(f"  {key}: {value}")
    assert figures["checkpoint"][0] == pytest.approx(1.0, abs=1e-6) and figures["checkpoint"][1] < 1e-4
    assert figures["auto"][0] >= 0.99
    # The Euler reversal is approximate on trained post-activation blocks: informative, not exact.
    for scheme in ("euler_fast", "euler"):
        assert 0.5 < figures[scheme][0] < 1.0 - 1e-6 and figures[scheme][1] > 1e-4
