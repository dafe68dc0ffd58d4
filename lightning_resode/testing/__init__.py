"""Test and benchmark helpers: timm ResNets trained normally (see ``lightning_resode.testing.trained``)."""

from .trained import (
    MODEL_NAMES,
    PRETRAIN_CLASSES,
    TRANSFER_CLASSES,
    DigitsSplit,
    TrainedResNet,
    accuracy,
    cache_dir,
    create_untrained,
    digits_split,
    residual_statistics,
    trained_resnet,
)

__all__ = [
    "MODEL_NAMES",
    "PRETRAIN_CLASSES",
    "TRANSFER_CLASSES",
    "DigitsSplit",
    "TrainedResNet",
    "accuracy",
    "cache_dir",
    "create_untrained",
    "digits_split",
    "residual_statistics",
    "trained_resnet",
]
