"""The smallest real CLI run tests start from: the quickstart recipe on resnet10t, 3 training steps, quiet.

Later arguments win (``tiny_run("--model.scheduler=cosine")``), so each test adds only what it is about.
"""

from __future__ import annotations

TINY = [
    "--config", "recipes/quickstart.yaml", "--logging.wandb=false", "--trainer.enable_progress_bar=false",
    "--model.model_name=resnet10t", "--model.scheduler=none", "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=16",
    "--memory.every_n_steps=50", "--fidelity.every_n_steps=50",
]
#: every command, with one batch of each split and one exact stage (diagnose needs a converted stage)
ALL_COMMANDS = ["--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1", "--model.stages=[layer4]", "--model.scheme=block"]
COMMANDS = ["fit", "validate", "test", "predict", "diagnose"]


def tiny_run(*extra: str) -> list[str]:
    return [*TINY, *extra]
