"""Saved activation bytes at rest (docs/design.md, "How we measure"): exact, device-independent, repeatable."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, run: Callable[[], object]) -> int:
    """Bytes of unique storages autograd saves during ``run()`` (a training forward), parameters excluded.

    Every tensor kept for backward passes through ``saved_tensors_hooks``' pack hook, including what an
    adjoint stage keeps with ``save_for_backward``; views of one storage count once.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages:
            seen[(str(t.device), ptr)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())
