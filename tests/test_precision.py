"""Every Lightning precision trains a converted timm ResNet with every scheme, on a real Trainer (CPU).

A tiny resnet18 (channels 8-64) on 32x32 digits, two optimizer steps. Where Lightning itself does not offer
a precision on CPU the case is skipped with Lightning's reason; where a precision cannot work with adjoint
stages, ``ResodeClassifier`` must refuse it at setup, naming the supported ones.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import timm

from lightning_resode import to_adjoint
from lightning_resode.convert import SCHEME_CHOICES
from lightning_resode.lit import DigitsDataModule, ResodeClassifier

PRECISIONS = ["32-true", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true"]
SCHEMES = ["euler_fast", "euler", "heun", "checkpoint", "backprop", "block", "block_fp16", "block_bf16"]
TINY = dict(channels=(8, 16, 32, 64), stem_width=8)


def _trainer(precision: str, root: Path) -> pl.Trainer:
    try:
        return pl.Trainer(
            accelerator="cpu", devices=1, precision=precision, max_steps=2, limit_train_batches=2, limit_val_batches=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(root),
        )
    except Exception as err:  # noqa: BLE001  (Lightning's own refusal, e.g. fp16 autocast on CPU)
        pytest.skip(f"Lightning does not offer precision={precision!r} on CPU: {err}")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_trains_with_every_scheme(precision: str, scheme: str, tmp_path: Path) -> None:
    if scheme not in SCHEME_CHOICES:
        pytest.skip(f"scheme {scheme!r} is not offered by this version (lightning_resode.convert.SCHEME_CHOICES)")
    trainer = _trainer(precision, tmp_path)
    pl.seed_everything(0)
    # float16 weights cannot carry AdamW's state (its eps is 0 in float16): 16-true trains with SGD
    optimizer = "sgd" if precision == "16-true" else "adamw"
    model = ResodeClassifier("resnet18", model_kwargs=TINY, scheme=scheme, optimizer=optimizer, lr=1e-2, scheduler="none")
    before = {k: v.detach().clone().double() for k, v in model.model.state_dict().items() if v.is_floating_point()}
    losses: list[float] = []

    class _Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            losses.append(float(outputs["loss"]))

    trainer.callbacks.append(_Record())
    trainer.fit(model, DigitsDataModule(image_size=32, batch_size=8))
    assert trainer.global_step == 2 and len(losses) == 2
    assert all(torch.isfinite(torch.tensor(losses)))
    after = model.model.state_dict()
    assert all(torch.isfinite(after[k]).all() for k in before)
    assert any(not torch.equal(after[k].double(), before[k]) for k in before if "layer1" in k), "layer1 did not train"


def test_16_true_with_adam_is_refused_at_setup_naming_what_works(tmp_path: Path) -> None:
    trainer = _trainer("16-true", tmp_path)
    model = ResodeClassifier("resnet18", model_kwargs=TINY, optimizer="adamw", scheduler="none")
    with pytest.raises(ValueError, match="16-true") as info:
        trainer.fit(model, DigitsDataModule(image_size=32, batch_size=8))
    assert "bf16-mixed" in str(info.value) and "sgd" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scheme", ["euler_fast", "euler", "heun", "checkpoint"])
def test_blocks_cast_with_half_or_bfloat16_train(dtype: torch.dtype, scheme: str) -> None:
    torch.manual_seed(0)
    model = to_adjoint(timm.create_model("resnet18", num_classes=10, **TINY), scheme=scheme).to(dtype)
    images = torch.randn(4, 3, 32, 32, dtype=dtype)
    loss = model(images).float().logsumexp(dim=-1).mean()
    loss.backward()
    grads = [p.grad for p in model.layer1.parameters()]
    assert all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)
