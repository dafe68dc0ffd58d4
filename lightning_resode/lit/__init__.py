"""Lightning side of lightning-resode: the classifier module, DataModules, callbacks, loggers and strategy checks."""

from .callbacks import FitSummary, GradientFidelity, MemoryMonitor, ReconstructionMonitor
from .checkpointing import AtomicCheckpointIO, InterruptCheckpoint, RandomStateCheckpoint, ResodeModelCheckpoint
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
from .guards import NonFiniteInputError, TrainingDivergedError
from .loggers import build_loggers
from .module import ResodeClassifier, export_timm_weights, load_weights_file
from .prediction import PredictionWriter

__all__ = [
    "AtomicCheckpointIO",
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
    "NonFiniteInputError",
    "PredictionWriter",
    "RandomStateCheckpoint",
    "ReconstructionMonitor",
    "ResodeModelCheckpoint",
    "ResodeClassifier",
    "SyntheticDataModule",
    "TrainingDivergedError",
    "build_loggers",
    "export_timm_weights",
    "load_weights_file",
]
