"""lightning-resode: fine-tune timm ResNets with memory-free stages (fit, validate, test, predict, diagnose, report).

    lightning-resode fit --config recipes/quickstart.yaml [--trainer.max_epochs=3 --model.scheme=heun …]
    lightning-resode fit --config recipes/quickstart.yaml --ckpt_path last        # resume
    lightning-resode predict --config recipes/quickstart.yaml --ckpt_path last    # -> <root>/predictions.csv
    lightning-resode diagnose --config recipes/quickstart.yaml [--ckpt_path last] [--diagnose.output diag.json]
    lightning-resode report runs/quickstart                                        # -> runs/quickstart/report/

The recipe is the source of truth: every option is a typed constructor argument, parsed (and rejected,
naming the bad key or value) before anything trains. Besides ``trainer``/``model``/``data``, a recipe has
``memory``, ``fidelity``, ``reconstruction``, ``checkpoint`` and ``prediction`` (the callbacks) and ``logging``
(loggers).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from ._commands import COMMANDS as _COMMANDS  # noqa: F401  (the commands, for callers of this module)
from ._commands import DIAGNOSE as _DIAGNOSE
from ._commands import PROG as _PROG
from ._commands import REPORT as _REPORT
from ._commands import check_command, report
from .convert import adjoint_stages
from .lit import data as _data  # noqa: F401  (makes the DataModules resolvable by class name)
from .lit.callbacks import FitSummary, GradientFidelity, MemoryMonitor, ReconstructionMonitor
from .lit.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointWriteError,
    InterruptCheckpoint,
    RandomStateCheckpoint,
    ResodeModelCheckpoint,
    ResumeOptions,
    check_checkpoint_fits,
    resolve_last,
    safe_load,
)
from .lit.data import ClassMismatchError, ImageReadError
from .lit.guards import NonFiniteInputError, TrainingDivergedError
from .lit.loggers import build_loggers, logger_specs, prepare_logger
from .lit.module import BatchTooSmallError, ResodeClassifier
from .lit.prediction import PredictionWriter
from .pretrained import PretrainedWeightsUnavailable

# what `diagnose --help` shows; the recipe's other sections are accepted (one recipe serves every command)
_DIAGNOSE_SECTIONS = ("help", "config", "print_config", "seed_everything", "model", "data", _DIAGNOSE, "ckpt_path")
#: model options only training reads: diagnose parses them (a recipe has them) but its --help leaves them out
_TRAINING_ONLY_MODEL_OPTIONS = (
    "optimizer", "lr", "weight_decay", "momentum", "scheduler", "warmup_epochs", "min_lr", "warmup_lr", "decay_epochs",
    "decay_milestones", "decay_rate", "patience_epochs", "plateau_monitor", "plateau_mode", "cooldown_epochs",
    "cycle_limit", "cycle_mul", "cycle_decay", "ema_decay", "compile", "label_smoothing", "mixup_alpha", "cutmix_alpha",
)


def _checkpoint_dir(root_dir: str | None) -> str:
    """Checkpoints live at a fixed place under the run root, so ``--ckpt_path last`` finds them on resume."""
    return os.path.join(root_dir or os.getcwd(), "checkpoints")


def _diagnose_options(batch_images: int = 8, output: str | None = None) -> None:
    """What diagnose runs on: one batch of the recipe's training data.

    Args:
        batch_images: how many images of one training batch the per-stage diagnosis runs on (at least 2, for
            BatchNorm; at most the data's batch size).
        output: also write the records as JSON to this path.
    """


def _hide_from_help(parser: LightningArgumentParser, keep: tuple[str, ...]) -> None:
    """Leave only the ``keep`` sections in ``--help``; the others still parse (a recipe has them all)."""
    for action in parser._actions:
        if action.dest.split(".")[0] not in keep:
            action.help = argparse.SUPPRESS
    # a SUPPRESS help would also drop these options from the model's saved hyperparameters; skip them in the
    # help formatter instead
    hidden = {f"model.{name}" for name in _TRAINING_ONLY_MODEL_OPTIONS}

    class _Formatter(parser.formatter_class):  # type: ignore[name-defined,misc]
        def add_argument(self, action: argparse.Action) -> None:
            if action.dest not in hidden:
                super().add_argument(action)

        def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: Any = None) -> None:
            super().add_usage(usage, [a for a in actions if a.dest not in hidden], groups, prefix)

    parser.formatter_class = _Formatter
    for name, group in parser.groups.items():
        if name.split(".")[0] not in keep:
            group.title, group.description = None, None


class ResodeProgressBar(RichProgressBar):
    """Rich's progress bar, closed when training ends, and without a meaningless version number.

    Lightning's bar stays live until teardown, after ``FitSummary`` printed its table, so its last frame came
    out below the table; and it shows the CSV logger's version as ``v_num: 0.000`` when W&B (whose run id it
    shows otherwise) is off.
    """

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if not isinstance(items.get("v_num"), str):
            items.pop("v_num", None)
        return items

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.teardown(trainer, pl_module, "fit")  # RichProgressBar's teardown stops the live display, nothing else


def _extra_callbacks(trainer_config: Any) -> list[Callback]:
    """The callbacks every run gets besides the recipe's sections (``memory``, ``fidelity``…)."""
    callbacks: list[Callback] = [FitSummary(), InterruptCheckpoint(), RandomStateCheckpoint(), ResumeOptions()]
    if trainer_config.get("enable_progress_bar") is not False:
        callbacks.append(ResodeProgressBar())
    return callbacks


def _missing(extra: list[Callback], callbacks: list[Any]) -> list[Callback]:
    """The extra callbacks not given already (any progress bar counts as the progress bar)."""
    present = {type(c) for c in callbacks}
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    return [c for c in extra if type(c) not in present and not (has_bar and isinstance(c, ProgressBar))]


def _class_path(instance: object) -> str:
    return f"{type(instance).__module__}.{type(instance).__qualname__}"


class _ResodeParser(LightningArgumentParser):
    """Dumps (``--print_config``, the run's ``config.yaml``) show the loggers and callbacks the CLI adds to the
    trainer, where Lightning would show ``logger: null`` and ``callbacks: null``.

    The ``logging`` section is replaced by the ``trainer.logger`` list it builds, so a dumped config run again
    (``--config config.yaml``) makes the same loggers, and the callbacks listed are not added twice.
    """

    show_runtime = True

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        if self.show_runtime and isinstance(cfg, Namespace) and "logging" in cfg and "trainer" in cfg:
            cfg = cfg.clone()
            trainer = cfg["trainer"]
            if trainer.get("logger") in (None, True):
                root = trainer.get("default_root_dir") or os.getcwd()
                trainer["logger"] = [_namespace(s) for s in logger_specs(root, **cfg["logging"].as_dict())]
                del cfg["logging"]
            callbacks = list(trainer.get("callbacks") or [])
            present = {c.get("class_path") for c in callbacks if isinstance(c, Namespace)}
            listed_bar = any(p and p.rsplit(".", 1)[-1].endswith("ProgressBar") for p in present)
            callbacks += [
                Namespace(class_path=_class_path(c))
                for c in _extra_callbacks(trainer)
                if _class_path(c) not in present and not (listed_bar and isinstance(c, ProgressBar))
            ]
            trainer["callbacks"] = callbacks
        return super().dump(cfg, *args, **kwargs)

    def print_usage(self, file: Any = None) -> None:
        # jsonargparse's usage line lists every option of every section (about 120 lines for ``fit``), which
        # buries the one-line error printed after it; the full list is what ``--help`` is for
        prog = self.prog.replace(" [options]", "")
        (file or sys.stdout).write(f"usage: {prog} [--config RECIPE.yaml] [--SECTION.KEY VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if re.search(r'Linked "model\.num_classes" must be given via', message):
            message = (
                "model.num_classes is not an option: it is the data's number of classes (digits: 10, an image "
                "folder: one per class sub-folder), linked into the model. For another number, use data with those "
                "classes, e.g. --data=SyntheticDataModule --data.init_args.num_classes=N, or an image folder with N "
                "class folders"
            )
        unknown = re.search(r"Parser key \"(\w+)\":.*?given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message, re.S)
        if unknown:  # jsonargparse's union dump (subtypes, NestedArg) around one unknown option of a class
            section, class_path, key = unknown.groups()
            message = f"{section} option {key!r} is not an option of {class_path}" + _close_init_arg(class_path, key, section)
        super().error(message + _did_you_mean(message, self), ex)


def _close_init_arg(class_path: str, key: str, section: str) -> str:
    """'; did you mean --data.init_args.batch_size?' from the class's own constructor arguments."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        accepted = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return ""
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    if close:
        return f"; did you mean --{section}.init_args.{close[0]}?"
    return f"; its options: {', '.join(a for a in accepted if a not in ('self', 'args', 'kwargs'))}"


def _did_you_mean(message: str, parser: ArgumentParser) -> str:
    """'; did you mean --model.scheme?' for an unknown key in an error message, from this parser's options."""
    match = re.search(r"(?:unrecognized arguments: --|does not accept (?:nested key|option|key) ')([\w.]+)", message)
    if not match:
        return ""
    known = {o.lstrip("-").split("=")[0] for a in getattr(parser, "_actions", []) for o in a.option_strings if o.startswith("--")}
    for action in getattr(parser, "_actions", []):  # the subcommands' own options (``fit``'s sections)
        for sub in (getattr(action, "choices", None) or {}).values():
            if isinstance(sub, ArgumentParser):
                known |= {o.lstrip("-") for a in sub._actions for o in a.option_strings if o.startswith("--")}
    close = difflib.get_close_matches(match.group(1), sorted(known), n=1, cutoff=0.75)
    return f"; did you mean --{close[0]}?" if close else ""


def _namespace(spec: dict[str, Any]) -> Namespace:
    return Namespace(class_path=spec["class_path"], init_args=Namespace(**spec.get("init_args", {})))


class _SaveConfigToLoggers(SaveConfigCallback):
    """Writes ``config.yaml`` to the log directory and the full resolved config to W&B, once: Lightning's own
    hyperparameter logging is off (``trainer.enable_autolog_hparams``), the module's hyperparameters (with the
    ``num_classes`` the data linked in) are the config's ``model`` section."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        config = self.config.as_dict()
        config["model"] = {**(config.get("model") or {}), **dict(pl_module.hparams)}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)


class _UsageError(Exception):
    """A configuration value rejected while building the model, data or trainer."""


def _reason(err: BaseException) -> str:
    """The constructor's own message; for a class chosen by name, jsonargparse lists it among its 'Errors:'."""
    text = str(err)
    if "Errors:" not in text:
        return text
    reasons = [line.strip()[2:] for line in text.split("Errors:", 1)[1].splitlines() if line.strip().startswith("- ")]
    reasons = [r for r in reasons if not r.startswith("Expected a <class 'NoneType'>")]
    return reasons[0] if reasons else text


class ResodeCLI(LightningCLI):
    """LightningCLI with the callbacks, loggers and checkpoint layout every lightning-resode run shares."""

    diagnose_mode = False

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MemoryMonitor, "memory")
        parser.add_lightning_class_args(GradientFidelity, "fidelity")
        parser.add_lightning_class_args(ReconstructionMonitor, "reconstruction")
        parser.add_lightning_class_args(ResodeModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        parser.set_defaults(
            {
                "trainer.log_every_n_steps": 1,  # Lightning's 50 hides train/loss in short runs
                "trainer.enable_autolog_hparams": False,  # _SaveConfigToLoggers writes the whole config once
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.add_function_arguments(build_loggers, "logging", skip={"root_dir"})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        if self.diagnose_mode:
            parser.add_function_arguments(_diagnose_options, _DIAGNOSE)
            parser.add_argument(
                "--ckpt_path",
                type=str | None,
                default=None,
                help="diagnose the weights of this Lightning checkpoint of the recipe's model ('last': "
                "<default_root_dir>/checkpoints/last.ckpt); default: the recipe's initial weights",
            )

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if self.diagnose_mode:
            _hide_from_help(self.parser, _DIAGNOSE_SECTIONS)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand != "fit" and config.get("ckpt_path") and config["model"].get("pretrained"):
            # the checkpoint's weights replace the hub's: evaluating a fine-tuned model needs no download
            config["model"]["pretrained"] = False

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        if isinstance(parser, _ResodeParser):
            parser.show_runtime = not self.diagnose_mode
        return parser

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` and read it safely; unlike LightningCLI, never take the model from it.

        LightningCLI re-parses the checkpoint's hyperparameters over the config, so a resnet18 checkpoint with a
        resnet50 recipe silently built a resnet18, and ``--model.lr`` on the command line was dropped. Here the
        config stays the source of truth: ``instantiate_classes`` refuses a checkpoint of another model, and
        ``ResumeOptions`` applies changed training options. ``last`` becomes the file with the most progress.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        self._checkpoint = None
        requested = config.get("ckpt_path")
        if not requested:
            return
        if requested == "last":
            folder = config.get("checkpoint", {}).get("dirpath") or _checkpoint_dir(config["trainer"].get("default_root_dir"))
            found = resolve_last(folder)
            if found is None:
                if subcommand != "fit":  # evaluating random weights is never what "last" meant
                    raise CheckpointError(
                        f"--ckpt_path last: no last.ckpt or interrupted.ckpt in {str(folder)!r}; run fit first, "
                        "or give a checkpoint file"
                    )
                return  # fit starts fresh, with Lightning's warning
            config["ckpt_path"] = str(found)
            requested = str(found)
        path = Path(requested)
        if path.exists() or "://" not in requested:
            if not path.is_file():
                raise CheckpointError(
                    f"--ckpt_path {requested!r} does not exist; give an existing .ckpt file, or 'last' to resume the "
                    "checkpoint with the most progress in this run's checkpoints folder"
                )
            self._checkpoint = (path, safe_load(path, mmap=True))

    def instantiate_classes(self) -> None:
        # a value the constructors reject (min_cosine=2, an unknown stage or model family) is a usage error
        # like an unknown key: one line naming it, before anything trains, not a traceback
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise _UsageError(_reason(err)) from err
        checkpoint = getattr(self, "_checkpoint", None)
        if checkpoint is not None:
            check_checkpoint_fits(self.model, checkpoint[1], checkpoint[0])
            self._checkpoint = None  # the trainer reads the file itself; do not keep the mapping open

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.diagnose_mode:
            return None  # type: ignore[return-value]  # diagnose runs the model itself, no Trainer needed
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config["trainer"]
        logger = trainer_config.get("logger")
        if logger in (None, True):
            root = trainer_config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = build_loggers(root, **config["logging"].as_dict())
        elif isinstance(logger, (list, tuple)):  # e.g. a dumped config run again
            kwargs["logger"] = [prepare_logger(item) for item in logger]
        kwargs["plugins"] = _with_atomic_checkpoints(kwargs.get("plugins", trainer_config.get("plugins")))
        callbacks = list(kwargs.pop("callbacks", None) or trainer_config.get("callbacks") or [])
        kwargs["callbacks"] = callbacks + _missing(_extra_callbacks(trainer_config), callbacks)
        if trainer_config.get("enable_progress_bar") is False:  # a dumped config lists the bar; Lightning refuses both
            kwargs["callbacks"] = [c for c in kwargs["callbacks"] if not isinstance(c, RichProgressBar)]
        return super().instantiate_trainer(**kwargs)


def _with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """Checkpoints are written atomically unless the recipe brings its own ``CheckpointIO``."""
    from lightning.fabric.plugins import CheckpointIO

    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else ([] if plugins is None else [plugins])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def _drop_tips(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


@contextlib.contextmanager
def each_warning_once() -> Iterator[None]:
    """While a command runs, a stage-policy warning identical to the one just before it is not shown again."""
    log = logging.getLogger("lightning_resode.policy")
    once = _OnceInARow()
    log.addFilter(once)
    try:
        yield
    finally:
        log.removeFilter(once)


class _OnceInARow(logging.Filter):
    """Drop a warning identical to the one just before it: a measurement that repeats a step (the memory monitor's
    warm-up and first step run on the same images) repeats its warning word for word, which says nothing new."""

    def __init__(self) -> None:
        super().__init__()
        self.previous: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        repeated = record.levelno >= logging.WARNING and message == self.previous
        self.previous = message
        return not repeated


def _quiet_startup() -> None:
    """Silence the start-up messages that every run prints and no user acts on: the seed announcement (the seed is
    in the config), Lightning's advert for its cloud logger, and a deprecation inside Lightning's own code."""
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_tips)  # the same filter once
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def _make_cli(args: list[str] | None, *, run: bool, parser_kwargs: dict[str, Any] | None = None) -> ResodeCLI:
    _quiet_startup()
    return ResodeCLI(
        ResodeClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=_SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        parser_class=_ResodeParser,
        args=args,
        run=run,
        parser_kwargs=parser_kwargs or {"prog": _PROG, "description": __doc__.split("\n")[0]},
        auto_configure_optimizers=False,
    )


def _resolve_checkpoint(ckpt_path: str, root_dir: str | None) -> Path:
    if ckpt_path == "last":
        found = resolve_last(_checkpoint_dir(root_dir))
        if found is None:
            raise CheckpointError(
                f"--ckpt_path last: no last.ckpt or interrupted.ckpt in {_checkpoint_dir(root_dir)!r}; run fit first, "
                "or give a checkpoint file"
            )
        return found
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (a path, or 'last')")
    return path


def _load_checkpoint_weights(model: ResodeClassifier, path: Path) -> None:
    """The network weights of one of our Lightning checkpoints, read with the safe loader (tensors only)."""
    checkpoint = safe_load(path)
    check_checkpoint_fits(model, checkpoint, path)
    prefix = "model."
    model.model.load_state_dict({k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    if model.policy is not None and "resode_policy" in checkpoint:
        model.policy.load_state_dict(checkpoint["resode_policy"])  # the methods the run used, not a fresh choice


def _diagnose(args: list[str]) -> None:
    """Per-stage reconstruction error, gradient fidelity and saved memory on one real batch of the recipe."""
    from .diagnose import diagnose, diagnose_table, write_diagnosis_json

    ResodeCLI.diagnose_mode = True
    try:
        with warnings.catch_warnings():  # args are sys.argv minus "diagnose", on purpose
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = _make_cli(args, run=False, parser_kwargs={"prog": f"{_PROG} {_DIAGNOSE}", "description": _diagnose.__doc__})
    finally:
        ResodeCLI.diagnose_mode = False
    options = cli.config[_DIAGNOSE]
    if options.batch_images < 2:
        raise SystemExit(
            f"{_PROG} diagnose: error: --diagnose.batch_images={options.batch_images}: the diagnosis trains with "
            "BatchNorm, which needs at least 2 images per batch; give 2 or more (default 8)"
        )
    if cli.config.get("ckpt_path"):
        path = _resolve_checkpoint(cli.config["ckpt_path"], cli.config["trainer"].get("default_root_dir"))
        _load_checkpoint_weights(cli.model, path)
        print(f"diagnosing the weights of {path}")
    datamodule = cli.datamodule
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, targets = next(iter(datamodule.train_dataloader()))
    model = cli.model.model
    if not adjoint_stages(model):
        raise SystemExit(f"{_PROG} diagnose: error: the recipe converts no stage (model.stages is empty)")
    device = _diagnose_device(cli.config["trainer"].get("accelerator"))
    model.to(device).train()
    if images.shape[0] < 2:
        raise SystemExit(
            f"{_PROG} diagnose: error: the training batch has {images.shape[0]} image; BatchNorm needs at least 2: "
            "raise --data.init_args.batch_size"
        )
    if options.batch_images > images.shape[0]:
        print(f"--diagnose.batch_images={options.batch_images}: one training batch has {images.shape[0]} images; using them all")
    batch = (images[: options.batch_images].to(device), targets[: options.batch_images].to(device))
    records = diagnose(model, batch)
    print(diagnose_table(records))
    if options.output:
        print(f"wrote {write_diagnosis_json(records, options.output)}")


def _diagnose_device(accelerator: Any) -> str:
    """The recipe's GPU when it asks for one (or ``auto``) and one is there; the CPU otherwise."""
    import torch

    wants_gpu = str(accelerator or "auto") in ("auto", "gpu", "cuda")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


# errors whose message already says what is wrong and what to do: the command prints it as one line (status 1)
_ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (
    PretrainedWeightsUnavailable,
    _UsageError,
    CheckpointError,
    CheckpointWriteError,
    BatchTooSmallError,
    ClassMismatchError,
    ImageReadError,
    NonFiniteInputError,
    TrainingDivergedError,
    FileNotFoundError,
)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: LightningCLI's subcommands, ``diagnose`` and ``report``."""
    argv = sys.argv[1:] if args is None else list(args)
    check_command(argv)  # the top-level help, or an early error for an unknown command
    try:
        with each_warning_once():
            if argv[0] == _DIAGNOSE:
                _diagnose(argv[1:])
                return
            if argv[0] == _REPORT:
                report(argv[1:])
                return
            cli = _make_cli(None if args is None else argv, run=True)  # None: LightningCLI reads sys.argv itself
    except _ONE_LINE_ERRORS as err:  # known, fixable: the message, not a traceback
        raise SystemExit(f"{_PROG}: error: {_one_line(err)}") from None
    _finish_wandb(cli.trainer)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _finish_wandb(trainer: Trainer) -> None:
    """Close W&B runs when the command ends, so the offline run file holds the last step and the summary."""
    # wandb.finish() closes the active run if the logger started one, and never starts one just to close it
    if "wandb" in sys.modules and any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        sys.modules["wandb"].finish()


if __name__ == "__main__":  # pragma: no cover
    main()
