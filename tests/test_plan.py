"""One plan per call, reports out through hooks, measurements without touching the stages, calibration only from
real training forwards."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from lightning_resode import AdjointSequential, adjoint_stages, policy_of, to_adjoint
from lightning_resode.adjoint import MIN_VALUES_PER_CHANNEL, planned
from stacks import conv_blocks, smooth_blocks


def _reports(stage: AdjointSequential) -> list:
    seen: list = []
    stage.register_report_hook(lambda s, report: seen.append(report))
    return seen


def test_each_backward_reports_the_plan_it_followed_through_hooks() -> None:
    stage = AdjointSequential(conv_blocks(4, channels=8), name="layer2").configure(method="block_fp16")
    seen = _reports(stage)
    stage(torch.randn(8, 8, 4, 4, requires_grad=True)).sum().backward()  # 128 values per channel
    stage(torch.randn(2, 8, 2, 2, requires_grad=True)).sum().backward()  # 8: too few for 16-bit inputs
    assert [r.method for r in seen] == ["block_fp16", "block"]
    assert stage.method == "block_fp16"  # the configuration is untouched; what ran is in the report
    few = seen[1].plan
    assert few.configured_method == "block_fp16" and few.values_per_channel == 8
    assert f"(< {MIN_VALUES_PER_CHANNEL})" in few.reason and seen[0].plan.reason is None
    assert stage.last_backward is seen[1]


def test_a_removed_hook_is_not_called() -> None:
    stage = AdjointSequential(smooth_blocks(3))
    seen: list = []
    handle = stage.register_report_hook(lambda s, r: seen.append(r))
    stage(torch.randn(2, 8, dtype=torch.float64, requires_grad=True)).sum().backward()
    handle.remove()
    stage(torch.randn(2, 8, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert len(seen) == 1


def test_a_measurement_runs_another_method_without_changing_the_stage() -> None:
    stage = AdjointSequential(smooth_blocks(16), "euler_fast")
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    stage(x).sum().backward()
    training_report = stage.last_backward
    with planned([stage], method="block", keep_input=True) as log:
        assert stage.method == "euler_fast"
        stage(x).sum().backward()
    measured = log.report(stage)
    assert measured.method == "block" and measured.plan.measurement and log.plan(stage) is measured.plan
    assert stage.last_backward is training_report  # a measurement is not the stage's last training backward
    with planned([stage], keep_input=True) as log:
        stage(x).sum().backward()
    assert log.report(stage).reconstruction_error is not None and training_report.reconstruction_error is None
    with pytest.raises(ValueError, match="unknown scheme 'blok'"):
        with planned([stage], method="blok"):
            pass


def test_nested_measurements_combine_innermost_last() -> None:
    a, b = AdjointSequential(smooth_blocks(4)), AdjointSequential(smooth_blocks(4, seed=1))
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    with planned([a, b], method="block", fallback=False), planned([a], method="checkpoint") as inner:
        b(a(x)).sum().backward()
        assert inner.report(a).method == "checkpoint" and inner.report(b) is None
    with planned([a, b], method="block") as outer:
        b(a(x)).sum().backward()
    assert outer.report(b).method == "block"


def _converted_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5, channels=(8, 16, 16, 16), stem_width=8, zero_init_last=False)
    return to_adjoint(model).train()


def test_the_policy_calibrates_on_the_first_training_forward_and_only_there() -> None:
    model = _converted_resnet()
    policy = policy_of(model)
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        model(x)  # no autograd: not a training step
    model.eval()(x)
    model.train()
    with planned(adjoint_stages(model)):
        model(x).sum().backward()  # inside a measurement: not a training step
    assert policy.step == 0 and not policy.decisions
    model(x).sum().backward()
    assert policy.step == 1 and {d.stage for d in policy.decisions} == set(adjoint_stages(model))


def test_a_plain_pytorch_loop_needs_no_call_and_from_adjoint_removes_the_hook() -> None:
    from lightning_resode import from_adjoint

    model = _converted_resnet()
    assert len(model._forward_pre_hooks) == 1
    copied = copy.deepcopy(model)
    from_adjoint(copied)
    assert len(copied._forward_pre_hooks) == 0 and len(model._forward_pre_hooks) == 1
    to_adjoint(model, scheme="block")  # re-converted: the old policy's hooks go with it
    assert len(model._forward_pre_hooks) == 0
    assert all(len(s._report_hooks) == 0 for s in adjoint_stages(model).values())


def test_measurement_contexts_take_stage_names_from_a_name_mapping() -> None:
    model = _converted_resnet()
    stages = adjoint_stages(model)
    x = torch.randn(8, 3, 64, 64)
    with planned(stages, methods={"layer1": "euler_fast"}) as log:
        model(x).sum().backward()
    assert log.report(stages["layer1"]).method == "euler_fast" and log.report(stages["layer2"]).method == "block"
    with pytest.raises(ValueError, match=r"unknown stage name\(s\) \['layr1'\]; valid: \['layer1'"):
        with planned(stages, methods={"layr1": "euler_fast"}):
            pass


def test_a_backbone_returning_feature_maps_calibrates() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=0, global_pool="", channels=(8, 16, 16, 16), stem_width=8, zero_init_last=False)
    to_adjoint(model).train()
    model(torch.randn(8, 3, 64, 64)).sum().backward()
    assert policy_of(model).step == 1 and policy_of(model).decisions


def test_each_training_forward_of_a_features_only_model_counts_once() -> None:
    model = to_adjoint(timm.create_model("resnet18", features_only=True, channels=(8, 16, 16, 16), stem_width=8)).train()
    for _ in range(3):
        sum(f.sum() for f in model(torch.randn(8, 3, 64, 64))).backward()
    assert policy_of(model).step == 3


def test_calibration_asked_for_under_no_grad_still_measures() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5, channels=(8, 16, 16, 16), stem_width=8, zero_init_last=False)
    with torch.no_grad():
        to_adjoint(model, calibration=torch.randn(8, 3, 64, 64))
    assert {d.stage for d in policy_of(model).decisions} == set(adjoint_stages(model))


def test_an_explicit_scheme_is_not_reported_as_checked_where_it_ran_exactly() -> None:
    import warnings

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5, channels=(8, 16, 16, 16), stem_width=8, zero_init_last=False)
    to_adjoint(model, scheme="euler_fast", stages=["layer4"], top_step_dtype=None).train()  # reconstruct every block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(4, 3, 32, 32)).sum().backward()  # layer4 at 1x1: 4 values per channel, it runs exactly
    (first,) = policy_of(model).decisions
    # reported once; a batch of the same size cannot measure it either, so the check waits for one that runs it
    assert "not measured on this batch" in first.reason and not policy_of(model).due()
    nan_batch = torch.full((8, 3, 128, 128), float("nan"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        policy_of(model).calibrate(model, nan_batch)  # the data's fault, not the method's: no verdict
    assert not [w for w in seen if "euler_fast" in str(w.message)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(8, 3, 128, 128)).sum().backward()  # 4x4 x 8 = 128 values: layer4 runs euler_fast
    assert model.layer4.last_backward.method == "euler_fast" and policy_of(model).due()
    with pytest.warns(UserWarning, match=r"stage layer4: scheme 'euler_fast' gives its parameters a gradient cosine"):
        model(torch.randn(8, 3, 128, 128)).sum().backward()  # checked first: measured, and wrong here
    assert not policy_of(model).due()
