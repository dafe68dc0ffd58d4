"""validate_distributed: real Trainer objects (no processes start until fit), real adjoint stages."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_resode import AdjointError, AdjointSequential
from lightning_resode.lit.distributed import DistributedSetupError, _check_strategy, validate_distributed


class _Block(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.bn(self.conv(x))


def _model(gradient: str = "adjoint") -> nn.Module:
    stage = AdjointSequential([_Block() for _ in range(3)], "euler_fast", gradient=gradient, name="layer1")
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), stage)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(devices=1),
        dict(devices=1, sync_batchnorm=True),  # Lightning ignores it on one device: nothing is converted
        dict(devices=2, strategy="ddp"),
        dict(devices=2, strategy="ddp_spawn"),
    ],
    ids=["single-device", "single-device-sync_batchnorm", "ddp", "ddp_spawn"],
)
def test_supported_setups_pass(kwargs: dict) -> None:
    validate_distributed(_trainer(**kwargs), _model())


def test_sync_batchnorm_flag_is_rejected_before_conversion() -> None:
    model = _model()
    with pytest.raises(DistributedSetupError, match=r"sync_batchnorm=True.*layer1.*sync_batchnorm=False"):
        validate_distributed(_trainer(devices=2, strategy="ddp", sync_batchnorm=True), model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_sync_batchnorm_modules_inside_stages_are_rejected_by_name() -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_model())
    with pytest.raises(DistributedSetupError, match=r"layer1\.0\.bn") as caught:
        validate_distributed(_trainer(devices=2, strategy="ddp"), model)
    assert isinstance(caught.value, AdjointError)  # callers catching the engine's errors catch this too
    assert "BatchNorm" in str(caught.value) and "gradient='backprop'" in str(caught.value)


def test_sync_batchnorm_outside_stages_or_in_backprop_stages_is_allowed() -> None:
    trainer = _trainer(devices=2, strategy="ddp")
    outside = _model()
    outside[0] = nn.Sequential(outside[0], nn.SyncBatchNorm(4))
    validate_distributed(trainer, outside)
    validate_distributed(trainer, nn.SyncBatchNorm.convert_sync_batchnorm(_model(gradient="backprop")))
    validate_distributed(_trainer(devices=2, strategy="ddp", sync_batchnorm=True), _model(gradient="backprop"))


def test_model_parallel_strategy_is_rejected_naming_the_supported_ones() -> None:
    trainer = _trainer(devices=2, strategy=ModelParallelStrategy())
    with pytest.raises(DistributedSetupError, match=r"ModelParallelStrategy.*layer1.*ddp, ddp_spawn, single-device"):
        validate_distributed(trainer, _model())


def test_model_without_adjoint_stages_passes_any_strategy() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    validate_distributed(_trainer(devices=2, strategy=ModelParallelStrategy(), sync_batchnorm=True), plain)


def test_fsdp_is_rejected() -> None:
    # Lightning builds an FSDP Trainer only on CUDA; the strategy object itself is real and built here.
    with pytest.raises(DistributedSetupError, match=r"'fsdp'.*ddp, ddp_spawn, single-device"):
        _check_strategy(FSDPStrategy(), [_model()[1]])
