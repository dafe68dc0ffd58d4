"""The trained fixtures are the same weights on every x86 machine: the fidelity tests then measure the same
networks everywhere. Fixtures trained in float32 on two threads drifted apart on another CPU (every weight
different after 144 steps), and the default's tiny-batch cosine fell from 0.999 to 0.981 there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_resode.testing.trained import cache_paths

REPO = Path(__file__).resolve().parents[1]
TRAIN = "from lightning_resode.testing import trained_resnet; trained_resnet('resnet50', True, size='small')"


def _train_elsewhere(cache: Path, **env: str) -> dict[str, torch.Tensor]:
    """Train the resnet50 zero_init_last fixture in a fresh process with ``env``, as another machine would."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "LIGHTNING_RESODE_CACHE": str(cache), **env}
    result = subprocess.run([sys.executable, "-c", TRAIN], env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    weights, _ = cache_paths("resnet50", True, size="small", root=cache)
    return load_file(str(weights))


def _here(trained_small) -> dict[str, torch.Tensor]:
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    fixture = trained_small("resnet50", True)  # trained in this process on first use, else the cached copy
    assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (threads, onednn)  # settings restored
    return load_file(str(fixture.path))


def test_thread_count_and_the_cpus_onednn_and_mkl_kernels_do_not_change_a_bit(trained_small, tmp_path: Path) -> None:
    here = _here(trained_small)
    # another thread count than this process's (one, or two where the tests run one thread per worker), oneDNN
    # and MKL held to AVX2 code paths
    threads = "2" if torch.get_num_threads() == 1 else "1"
    there = _train_elsewhere(tmp_path, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, DNNL_MAX_CPU_ISA="AVX2",
                             MKL_ENABLE_INSTRUCTIONS="AVX2")
    assert here.keys() == there.keys()
    different = [k for k in here if not torch.equal(here[k], there[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_another_vector_width_moves_a_few_weights_by_less_than_a_rounding_step(trained_small, tmp_path: Path) -> None:
    """PyTorch's own vectorised reductions (BatchNorm statistics) sum in an order set by the vector width; in
    float64 that changes about 0.1 % of the float32 weights, each by less than a rounding step of its tensor's
    largest weight (measured 6e-8 relative; float32 training differed by up to 2.8 between thread counts)."""
    here = _here(trained_small)
    there = _train_elsewhere(tmp_path, ATEN_CPU_CAPABILITY="avx2")
    values = changed = 0
    for key, a in here.items():
        b = there[key]
        if not a.is_floating_point():
            assert torch.equal(a, b), key
            continue
        scale = torch.finfo(torch.float32).eps * max(float(a.abs().max()), float(b.abs().max()))
        assert float((a - b).abs().max()) <= scale, key
        values, changed = values + a.numel(), changed + int((a != b).sum())
    assert changed <= 0.01 * values, (changed, values)
