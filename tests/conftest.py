"""Shared test setup: offline W&B, deterministic seeds, small thread counts (2-core CI)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_small():
    """``trained_small(model_name, zero_init_last)``: a fresh copy of a small timm ResNet trained with backprop.

    Trained on first use and cached (``lightning_resode.testing.cache_dir()``), so later sessions only load it.
    Untrained timm ResNets have all-zero residual branches; gradient-fidelity tests must use these instead.
    """
    from lightning_resode.testing import trained_resnet

    def get(model_name: str = "resnet50", zero_init_last: bool = False):
        return trained_resnet(model_name, zero_init_last, size="small")

    return get
