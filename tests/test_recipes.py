"""Every recipe parses and instantiates (model, data, trainer) with tiny CPU overrides, so none can rot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_resode.cli import _make_cli
from lightning_resode.convert import adjoint_stages

RECIPES = sorted(Path("recipes").glob("*.yaml"))


def _image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), color=(10, 20, 30)).save(root / split / label / "x.png")
    return root


def test_recipes_exist() -> None:
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "cifar10_resnet101", "cifar10_resnet152", "imagenet_folder_resnet152"} <= names
    assert {"ode_resnet_euler", "ode_resnet_heun", "ode_two_phase_tied", "ode_two_phase_untied"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_instantiates(recipe: Path, tmp_path: Path) -> None:
    overrides = [
        "--config", str(recipe), f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true", "--logging.wandb=false",
        "--model.pretrained=false",
    ]
    text = recipe.read_text()
    if "ImageFolderDataModule" in text:
        overrides.append(f"--data.init_args.root={_image_folder(tmp_path / 'images')}")
    if "weights_file" in text:  # phase 2 of the two-phase route starts from phase 1's checkpoint
        tied = _make_cli(["--config", "recipes/ode_two_phase_tied.yaml", "--logging.wandb=false",
                          f"--trainer.default_root_dir={tmp_path}"], run=False)
        torch.save({"state_dict": tied.model.state_dict()}, tmp_path / "tied.ckpt")
        overrides.append(f"--model.weights_file={tmp_path / 'tied.ckpt'}")
    cli = _make_cli(overrides, run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    if cli.model.hparams.scheme != "auto":
        assert adjoint_stages(cli.model.model), "every recipe trains some stage with the adjoint"
    if "weights_file" in text:
        stage = cli.model.model.stage
        assert torch.equal(stage[0].conv1.weight, stage[5].conv1.weight) and stage[0] is not stage[5]
