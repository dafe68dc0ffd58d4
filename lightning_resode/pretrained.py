"""timm model creation with pretrained weights from the hub or a local file, failing fast when offline.

Clusters often have no internet on compute nodes; there a hub download hangs or fails deep inside
huggingface_hub. We check reachability first (short timeout) and say how to pass a local file instead.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
from torch import nn

LOCAL_WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin")


class PretrainedWeightsUnavailable(RuntimeError):
    """The hub cannot be reached and the weights are not in the local cache."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout_s: float) -> bool:
    if _hub_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _cached_on_disk(model_name: str) -> bool:
    """Whether the hub weights for ``model_name`` are already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(model_name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_id:
            return False
        return any(
            isinstance(try_to_load_from_cache(hub_id, filename), str)
            for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
        )
    except Exception:  # noqa: BLE001 (any failure here just means "not known to be cached")
        return False


def _classifier_size(model_name: str, path: Path) -> int | None:
    """Rows of the classifier weight stored in ``path`` (None if the file has no recognisable classifier)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    if not isinstance(classifier, str):
        return None
    weight = timm.models.load_state_dict(str(path)).get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None else None


def _offline_message(model_name: str) -> str:
    return (
        f"pretrained weights for {model_name!r} need the Hugging Face hub, which is unreachable from here "
        "(or HF_HUB_OFFLINE is set) and they are not in the local cache. Download the weights on a machine "
        "with internet (e.g. timm.create_model(name, pretrained=True) and save model.state_dict(), or the hub's "
        "model.safetensors) and pass the file: create_model(name, checkpoint='weights.safetensors') "
        "(timm: pretrained_cfg_overlay=dict(file=...)); .safetensors and .pth both work"
    )


def create_model(
    model_name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    hub_timeout_s: float = 3.0,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with weights from ``checkpoint`` (a local file) or the hub (``pretrained=True``).

    A local checkpoint goes through timm's own loader (``pretrained_cfg_overlay=dict(file=...)``), so the
    classifier is adapted to ``num_classes`` exactly as for hub weights. Offline, the hub path raises
    ``PretrainedWeightsUnavailable`` within ``hub_timeout_s`` instead of hanging.
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (expected one of {LOCAL_WEIGHT_SUFFIXES})")
        if not path.name.endswith(LOCAL_WEIGHT_SUFFIXES):
            raise ValueError(f"checkpoint {path.name!r} has an unknown suffix; valid: {LOCAL_WEIGHT_SUFFIXES}")
        overlay: dict[str, Any] = dict(file=str(path))
        head_size = _classifier_size(model_name, path)
        if head_size is not None:
            overlay["num_classes"] = head_size  # timm keeps the file's classifier when num_classes matches it
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    if not _cached_on_disk(model_name) and not _hub_reachable(hub_timeout_s):
        raise PretrainedWeightsUnavailable(_offline_message(model_name))
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except OSError as err:  # huggingface_hub's offline / connection errors derive from OSError
        raise PretrainedWeightsUnavailable(_offline_message(model_name)) from err
