"""diagnose() records and the auto policy, on real timm ResNets against exact backprop."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from lightning_resode import adjoint_stages, diagnose, to_adjoint
from lightning_resode.diagnose import diagnose_table, write_diagnosis_json

NARROW = dict(channels=(16, 32, 64, 128), stem_width=16, num_classes=5)


def _large_residual_model():
    """zero_init_last=False: residual branches as large as the identity, where a plain Euler reversal fails."""
    return timm.create_model("resnet18", pretrained=False, zero_init_last=False, **NARROW)


def _batch():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def _model_cosine(model, reference, batch) -> float:
    images, targets = batch
    for m in (model, reference):
        m.train()
        m.zero_grad()
        F.cross_entropy(m(images), targets).backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    e = torch.cat([p.grad.flatten() for p in reference.parameters()]).double()
    return float(F.cosine_similarity(g, e, dim=0))


def test_diagnose_records_measure_the_stages_and_leave_the_model_untouched(tmp_path) -> None:
    # top_step_dtype=None: every block, the top one included, is reversed (resnet18 stages have one residual block)
    model = to_adjoint(_large_residual_model(), scheme="euler_fast", top_step_dtype=None)
    model.layer4.configure(method="checkpoint")
    model.eval()
    before = copy.deepcopy(model.state_dict())
    records = diagnose(model, _batch())
    assert [r.stage for r in records] == ["layer1", "layer2", "layer3", "layer4"]
    by_name = {r.stage: r for r in records}
    exact = by_name["layer4"]
    assert exact.method == "checkpoint" and exact.reconstruction_error is None
    assert exact.grad_cosine == pytest.approx(1.0, abs=1e-5) and exact.grad_relative_error < 1e-4
    assert by_name["layer1"].depth == 2 and by_name["layer1"].residual_ratio > 0.3  # large branches
    assert by_name["layer1"].reconstruction_error > 0.1  # a plain Euler reversal of large branches is poor
    assert by_name["layer1"].grad_cosine < 0.99  # and below layer4 errors reach its gradient
    assert all(r.saved_bytes > 0 for r in records)
    # the model is as it was: eval mode, BatchNorm running statistics untouched
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    table = diagnose_table(records)
    assert table.count("\n") == 5 and "| layer3 | euler_fast | 2 |" in table
    rows = json.loads(write_diagnosis_json(records, tmp_path / "d" / "diag.json").read_text())
    assert rows[0]["stage"] == "layer1" and set(rows[0]) == set(records[0].as_dict())


def test_diagnose_calibrates_an_auto_model_first_and_says_why() -> None:
    model = to_adjoint(_large_residual_model())  # scheme="auto": not calibrated yet
    records = diagnose(model, _batch())
    assert all(r.reason for r in records)  # each stage's method comes with the policy's reason
    assert all(r.grad_cosine >= 0.99 for r in records), diagnose_table(records)
    assert "Why each stage uses its method" in diagnose_table(records)


def test_a_batch_diagnose_cannot_measure_is_refused_naming_what_is_wrong():
    model = to_adjoint(_large_residual_model(), scheme="block_fp16", check=False)
    images, targets = _batch()
    poisoned = images.clone()
    poisoned[2, 1, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        diagnose(model, (poisoned, targets))
    with pytest.raises(ValueError, match=r"8 images but targets of shape \(5,\)"):
        diagnose(model, (images, targets[:5]))
