"""timm ResNets trained with plain backprop on scikit-learn's digits: the weights fidelity claims are made on.

Why these exist: an *untrained* timm ResNet zero-initialises the last BatchNorm of every block, so each residual
branch is exactly zero, every block is the identity on its (post-ReLU) input, and any gradient-fidelity check
on it is trivially exact. Users fine-tune checkpoints trained normally: large residual branches and a ReLU
after each sum that clips. These fixtures are such networks, small enough to train on a CPU:

- ``size="full"``: timm resnet50 / resnet101 as timm builds them, on digits 0–4 upscaled to 64×64 RGB
  (benchmarks; ``scripts/train_fixtures.py`` builds them, a few minutes each);
- ``size="small"``: the same architectures (block counts, bottlenecks, post-activation ReLU) made narrow with
  timm's ``channels=`` argument, on 32×32 (tests; seconds each).

Each is trained once, deterministically (fixed seeds, fixed data order, deterministic algorithms; in float64, on one
thread, without oneDNN, with MKL held to its AVX2 code path by ``MKL_CBWR=AVX2`` in the environment, so that
another x86 CPU trains the same weights: see ``_reproducible``), and cached
under ``$LIGHTNING_RESODE_CACHE`` or ``~/.cache/lightning-resode/trained`` as a ``.safetensors`` state dict plus
a JSON record (held-out accuracy, per-stage residual ratio and ReLU clip fraction, seed, versions, and a hash of
the training recipe, which is also in the file name: change the recipe and the old cache is simply not used).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

Size = Literal["full", "small"]
MODEL_NAMES: tuple[str, ...] = ("resnet50", "resnet101")
SIZES: tuple[str, ...] = ("full", "small")
PRETRAIN_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4)
TRANSFER_CLASSES: tuple[int, ...] = (5, 6, 7, 8, 9)
#: Bump when the training code changes in a way the recipe dict below does not capture.
#: 2: trained in float64 on one thread without oneDNN, so every x86 CPU trains the same weights.
#: 3: MKL held to its AVX2 code path (``MKL_CBWR=AVX2``): MKL's float64 GEMMs took another path on AVX-512
#:    CPUs, and a fixture trained there differed in every tensor from one trained on an AVX2 CPU.
_RECIPE_VERSION = 3
#: MKL reads this when it first runs, so it must be in the environment before the process's first matrix
#: product (the test suite's conftest and the Makefile set it before torch loads).
MKL_REPRODUCIBLE_ENV = ("MKL_CBWR", "AVX2")
_RECIPES: dict[str, dict[str, Any]] = {
    "full": {"image_size": 64, "model_kwargs": {}, "epochs": 15, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "max_shift": 4},
    "small": {
        "image_size": 32,
        "model_kwargs": {"channels": [16, 32, 64, 128]},
        "epochs": 8,
        "batch_size": 32,
        "lr": 2e-3,
        "weight_decay": 0.05,
        "max_shift": 2,
    },
}
_TEST_FRACTION = 1 / 3
_TRAIN_DTYPE = torch.float64
_SPLIT_SEED = 0


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DigitsSplit:
    """Images (N, 3, S, S) scaled to [-1, 1] and labels renumbered 0… in the order of ``classes``."""

    classes: tuple[int, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def digits_split(classes: Sequence[int], image_size: int, *, test_fraction: float = _TEST_FRACTION, split_seed: int = _SPLIT_SEED) -> DigitsSplit:
    """scikit-learn's bundled 8×8 digits (no download) of ``classes``, upscaled to RGB, split train / held-out.

    The split is a fixed permutation (``split_seed``), the same on every machine.
    """
    from sklearn.datasets import load_digits

    classes = tuple(int(c) for c in classes)
    if not classes or any(c not in range(10) for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct digits 0..9, got {classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    targets = torch.tensor(digits.target, dtype=torch.long)
    keep = torch.isin(targets, torch.tensor(classes))
    images = torch.tensor(digits.images, dtype=torch.float32)[keep].unsqueeze(1) / 16.0
    images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor([classes.index(int(t)) for t in targets[keep]], dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(classes, images[train], labels[train], images[test], labels[test])


# ---------------------------------------------------------------------------------------------- models
def _check(model_name: str, size: str) -> None:
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown fixture model {model_name!r}; valid: {list(MODEL_NAMES)}")
    if size not in _RECIPES:
        raise ValueError(f"unknown fixture size {size!r}; valid: {list(SIZES)}")


def create_untrained(model_name: str, zero_init_last: bool, *, size: Size = "full", seed: int = 0, num_classes: int = len(PRETRAIN_CLASSES)) -> nn.Module:
    """The fixture's architecture with timm's initialisation from ``seed`` (the global RNG is left untouched)."""
    _check(model_name, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, zero_init_last=zero_init_last, **_kwargs(size)
        )


def _kwargs(size: str) -> dict[str, Any]:
    kwargs = dict(_RECIPES[size]["model_kwargs"])
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    return kwargs


def _stages(model: nn.Module) -> dict[str, nn.Sequential]:
    return {f"layer{i}": getattr(model, f"layer{i}") for i in range(1, 5)}


def _last_act(block: nn.Module) -> nn.Module:
    """The activation after the residual sum (``act3`` of a Bottleneck, ``act2`` of a BasicBlock)."""
    for name in ("act3", "act2"):
        if hasattr(block, name):
            return getattr(block, name)
    raise TypeError(f"not a timm ResNet v1 block: {type(block).__name__}")


@torch.no_grad()
def residual_statistics(model: nn.Module, images: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per stage of a timm ResNet v1, over its shape-preserving blocks x ↦ relu(x + f(x)), in eval mode:

    - ``residual_ratio``: mean of ‖b(x) − x‖ / ‖x‖ (0 for an untrained zero-init network: b is the identity);
    - ``clip_fraction``: share of the coordinates of x + f(x) that are negative, i.e. that the ReLU after the
      sum sets to zero (what a reverse Euler step cannot recover).
    """
    was_training = model.training
    model.eval()
    ratios: dict[str, list[float]] = {}
    clipped: dict[str, list[float]] = {}
    handles = []
    for name, stage in _stages(model).items():
        ratios[name], clipped[name] = [], []
        for block in stage:
            if getattr(block, "downsample", None) is not None:
                continue

            def ratio_hook(_m, args, out, name=name) -> None:
                x = args[0]
                ratios[name].append(float((out - x).norm() / x.norm().clamp_min(1e-30)))

            def clip_hook(_m, args, name=name) -> None:
                clipped[name].append(float((args[0] < 0).float().mean()))

            handles.append(block.register_forward_hook(ratio_hook))
            handles.append(_last_act(block).register_forward_pre_hook(clip_hook))
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {
        name: {
            "blocks": len(ratios[name]),
            "residual_ratio": sum(ratios[name]) / max(len(ratios[name]), 1),
            "clip_fraction": sum(clipped[name]) / max(len(clipped[name]), 1),
        }
        for name in ratios
    }


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        correct = sum(int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum()) for i in range(0, len(labels), batch_size))
    finally:
        model.train(was_training)
    return correct / len(labels)


# ---------------------------------------------------------------------------------------------- training
def recipe(model_name: str, zero_init_last: bool, *, size: Size = "full", seed: int = 0) -> dict[str, Any]:
    """Everything that determines the trained weights (its hash names the cache entry)."""
    _check(model_name, size)
    return {
        "recipe_version": _RECIPE_VERSION,
        "model_name": model_name,
        "zero_init_last": bool(zero_init_last),
        "size": size,
        "seed": int(seed),
        "classes": list(PRETRAIN_CLASSES),
        "test_fraction": _TEST_FRACTION,
        "split_seed": _SPLIT_SEED,
        "optimizer": "AdamW",
        "train_dtype": str(_TRAIN_DTYPE).replace("torch.", ""),
        **_RECIPES[size],
    }


def recipe_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background fill): the only augmentation."""
    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[n, :, dy : dy + size, dx : dx + size] for n, (dy, dx) in enumerate(offsets)])


@contextlib.contextmanager
def _reproducible() -> Iterator[None]:
    """Train the same weights on any x86 CPU, with the caller's torch settings restored afterwards.

    Floating-point sums depend on how a kernel splits them: across threads, and across the vector width or
    blocking that oneDNN and MKL pick for the CPU at hand. Fixtures trained in float32 with two threads on
    another machine drifted far enough apart for the fidelity tests to fail there. So training runs on one
    thread, without oneDNN (plain im2col + GEMM convolutions), with deterministic algorithms, in float64:
    what still depends on the CPU (the order inside a vectorised reduction) is then ~1e-16 relative, far
    below the float32 rounding of the saved weights.
    """
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # not mkldnn.flags(): it also sets TF32 options and warns on CPU builds
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.mkldnn.enabled = onednn
        torch.set_num_threads(threads)


def train(model_name: str, zero_init_last: bool, *, size: Size = "full", seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Train one fixture with plain backprop (no cache); returns the model in eval mode and its record."""
    name, value = MKL_REPRODUCIBLE_ENV
    if os.environ.get(name) != value:
        warnings.warn(
            f"training fixture {model_name} without {name}={value} in the environment: on a CPU with AVX-512 its "
            f"weights will differ from other machines'; set {name}={value} before Python starts (make test does)",
            RuntimeWarning,
            stacklevel=2,
        )
    spec = recipe(model_name, zero_init_last, size=size, seed=seed)
    data = digits_split(PRETRAIN_CLASSES, spec["image_size"], test_fraction=spec["test_fraction"], split_seed=spec["split_seed"])
    start = time.perf_counter()
    with _reproducible(), torch.random.fork_rng(devices=[]):
        model = create_untrained(model_name, zero_init_last, size=size, seed=seed).to(_TRAIN_DTYPE)
        train_images = data.train_images.to(_TRAIN_DTYPE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
        order = torch.Generator().manual_seed(seed)
        n, batch = len(data.train_labels), spec["batch_size"]
        steps = spec["epochs"] * (n // batch)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec["lr"], total_steps=steps, pct_start=0.15)
        torch.manual_seed(seed)
        model.train()
        losses = []
        for _ in range(spec["epochs"]):
            permutation = torch.randperm(n, generator=order)
            for i in range(n // batch):
                idx = permutation[i * batch : (i + 1) * batch]
                images = _shift(train_images[idx], spec["max_shift"], order)
                loss = F.cross_entropy(model(images), data.train_labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
        model.float()  # the fixtures are float32 networks, as users fine-tune them
    seconds = time.perf_counter() - start
    model.eval()
    info = {
        "recipe": spec,
        "recipe_hash": recipe_hash(spec),
        "steps": steps,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "held_out_accuracy": accuracy(model, data.test_images, data.test_labels),
        "held_out_images": len(data.test_labels),
        "train_images": n,
        "stages": residual_statistics(model, data.test_images),
        "training_seconds": round(seconds, 1),
        "training_threads": 1,
        "mkl_cbwr": os.environ.get(MKL_REPRODUCIBLE_ENV[0], ""),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    return model, info


# ---------------------------------------------------------------------------------------------- cache
@dataclass
class TrainedResNet:
    """A fixture: a fresh model (eval mode) loaded from the cache, its training record and the weights' path."""

    model: nn.Module
    info: dict[str, Any]
    path: Path


def cache_dir() -> Path:
    """``$LIGHTNING_RESODE_CACHE`` if set, else ``~/.cache/lightning-resode/trained``."""
    root = os.environ.get("LIGHTNING_RESODE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lightning-resode" / "trained"


def cache_paths(model_name: str, zero_init_last: bool, *, size: Size = "full", seed: int = 0, root: Path | None = None) -> tuple[Path, Path]:
    """(weights, record) paths of one fixture's cache entry."""
    spec = recipe(model_name, zero_init_last, size=size, seed=seed)
    stem = f"{model_name}-{'zil' if zero_init_last else 'nozil'}-{size}-seed{seed}-{recipe_hash(spec)}"
    root = cache_dir() if root is None else Path(root)
    return root / f"{stem}.safetensors", root / f"{stem}.json"


@contextlib.contextmanager
def _entry_lock(weights: Path) -> Iterator[None]:
    """One process at a time trains a cache entry; the others wait, then load it (POSIX ``flock``; elsewhere each
    trains its own copy, and the atomic writes keep the entry whole)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    weights.parent.mkdir(parents=True, exist_ok=True)
    with open(weights.with_name(f".{weights.stem}.lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache entry is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def trained_resnet(
    model_name: str,
    zero_init_last: bool = True,
    *,
    size: Size = "full",
    seed: int = 0,
    root: Path | str | None = None,
    train_if_missing: bool = True,
) -> TrainedResNet:
    """A timm ``model_name`` trained with backprop on digits 0–4 (see the module doc); trains on first use.

    Every call returns a new model, so callers may convert or fine-tune it. ``train_if_missing=False`` raises
    ``FileNotFoundError`` instead of training (e.g. to prove a cache hit).
    """
    from safetensors.torch import load_file, save_file

    weights, record = cache_paths(model_name, zero_init_last, size=size, seed=seed, root=None if root is None else Path(root))
    if not (weights.exists() and record.exists()):
        if not train_if_missing:
            raise FileNotFoundError(f"no cached fixture at {weights}; call with train_if_missing=True or run scripts/train_fixtures.py")
        with _entry_lock(weights):
            # another process (a test worker, a DDP rank) may have trained it while this one waited: load that
            if not (weights.exists() and record.exists()):
                model, info = train(model_name, zero_init_last, size=size, seed=seed)
                state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
                _atomic_write(weights, lambda tmp: save_file(state, tmp))
                # the record is written last: its presence marks a complete entry
                _atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    info = json.loads(record.read_text())
    model = create_untrained(model_name, zero_init_last, size=size, seed=seed)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return TrainedResNet(model, info, weights)
