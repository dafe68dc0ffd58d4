"""Lightning side of lightning-resode: the classifier module, DataModules, callbacks, loggers and strategy checks."""

from .callbacks import FitSummary, GradientFidelity, InterruptCheckpoint, MemoryMonitor, ReconstructionMonitor
from .data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFiles,
    ImageFolderDataModule,
    ImageReadError,
    SyntheticDataModule,
)
from .ema import ModelEma
from .loggers import build_loggers
from .module import ResodeClassifier, export_timm_weights, load_weights_file
from .prediction import PredictionWriter

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FitSummary",
    "GradientFidelity",
    "ImageFiles",
    "ImageFolderDataModule",
    "ImageReadError",
    "InterruptCheckpoint",
    "MemoryMonitor",
    "ModelEma",
    "PredictionWriter",
    "ReconstructionMonitor",
    "ResodeClassifier",
    "SyntheticDataModule",
    "build_loggers",
    "export_timm_weights",
    "load_weights_file",
]
