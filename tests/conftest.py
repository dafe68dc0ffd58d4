"""Shared test setup: offline W&B, deterministic seeds, OpenMP threads that sleep instead of spin, one thread per
worker process where pytest-xdist runs the suite (``make test``).

Several tests start subprocesses (DDP workers, the SIGTERM resume run) that share the CI machine's two
cores with the test process. OpenMP's default waiting policy spins, and oversubscribed spinning slowed one
such test from 21 s to 198 s; ``OMP_WAIT_POLICY=PASSIVE`` must be set before torch loads its OpenMP runtime,
so it is set here, above ``import torch`` (the Makefile sets it as well).

``MKL_CBWR=AVX2`` holds MKL to one code path on every x86 CPU: on AVX-512 CPUs its float64 GEMMs otherwise
sum in another order, and the trained fixtures this suite builds would differ from another machine's. MKL
reads it on its first call, so it too is set before anything runs.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MKL_CBWR", "AVX2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker process (``make test`` runs two): more would oversubscribe the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
