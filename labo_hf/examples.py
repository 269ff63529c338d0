"""The shared base of the example scripts (``run_translation.py``, ``run_image_classification.py``).

Each script keeps its task: data loading, preprocessing, model building and metrics. What they share lives
here, in the order of the stages of the transformers example scripts:

1. arguments: `ExampleModelArguments` and `ExampleDataArguments` (the fields both scripts have, validated in
   ``__post_init__``), `argument` (one field with its help), `parse_args` (flags, or one .json/.yaml file of
   them) and `HelpFormatter`;
2. the run's start: `start_run` (logging, the launch check, the output folder's guard with the run's
   identity from `run_identity`, the checkpoint to resume from, the seed), and `load_hub_or_local` for every
   Hub id or local path the scripts load;
3. the tail: `train_evaluate_predict` (train, save, evaluate, predict, model card or Hub upload).

Script-side glue: the library (`labo_hf.trainer` and below) never imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser, set_seed

from labo_hf.output_folder import prepare_output_dir
from labo_hf.run_record import check_same_run, read_run_record
from labo_hf.script_utils import (
    check_hub_reachable_or_local,
    check_launch_matches_world_size,
    configure_logging,
    hub_load_errors,
    resolve_checkpoint,
)

__all__ = [
    "ExampleDataArguments",
    "ExampleModelArguments",
    "HelpFormatter",
    "argument",
    "load_hub_or_local",
    "parse_args",
    "run_identity",
    "start_run",
    "train_evaluate_predict",
]

logger = logging.getLogger(__name__)

ARGUMENT_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def argument(help_text: str, default: Any = None, **metadata: Any) -> Any:
    """A dataclass field for `HfArgumentParser`: its --help text, default and other metadata (``choices``)."""
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass
class ExampleModelArguments:
    """The model fields both scripts share: pretrained (--model_name_or_path) or from scratch (--model_type).

    Scripts subclass it to add their own fields and to give --model_type its choices."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained checkpoint to fine-tune: a Hub id or a local folder. Leave unset and pass "
            "--model_type to train from scratch."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Train a model of this type from scratch (its default config, see --config_overrides)."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Pretrained config (Hub id or local folder), if not the one of --model_name_or_path."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "From scratch only: comma-separated config changes, e.g. 'hidden_size=64,num_layers=2'."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the models and data sets downloaded from the Hub."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use (branch name, tag name or commit id)."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for private models and data sets (default: the one of `hf auth login`)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models defined on the Hub by their own modeling code (executes that code)."},
    )

    def __post_init__(self) -> None:
        if self.model_type is not None and self.model_name_or_path is not None:
            raise ValueError(
                "--model_type trains a new model from scratch and cannot be combined with --model_name_or_path; "
                "pass only one of them."
            )
        if self.config_overrides is not None and (self.model_name_or_path or self.config_name):
            raise ValueError(
                "--config_overrides applies to a model trained from scratch (--model_type) and cannot be "
                "combined with --model_name_or_path or --config_name."
            )

    @property
    def hub_kwargs(self) -> dict[str, Any]:
        """Keywords of every ``from_pretrained`` call."""
        return {
            "cache_dir": self.cache_dir,
            "revision": self.model_revision,
            "token": self.token,
            "trust_remote_code": self.trust_remote_code,
        }


@dataclass
class ExampleDataArguments:
    """The data fields both scripts share: a Hub data set and how many examples of each split to keep; and
    --overwrite_output_dir, the output-folder flag transformers 5's TrainingArguments no longer has."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Data set on the Hub (or a local data set folder), via datasets."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only N training examples (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only N validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only N test examples."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete the contents of --output_dir and start a new run there. Without it, a non-empty "
            "--output_dir must hold this same run (same regularizer, alpha, T, model and training data), which "
            "resumes from its newest complete checkpoint; any other non-empty folder is refused."
        },
    )

    def __post_init__(self) -> None:
        if self.dataset_config_name is not None and self.dataset_name is None:
            raise ValueError("--dataset_config_name needs --dataset_name.")
        for flag in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be at least 1, got {value}.")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the script's docstring verbatim (its commands stay copy-pasteable) and every default."""


# The script's own defaults: given the flags the user set and their values, the flag -> value pairs to apply.
ScriptDefaults = Callable[[set[str], dict[str, Any]], dict[str, str]]


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[Any] | None = None,
    *,
    description: str | None,
    script_defaults: ScriptDefaults | None = None,
) -> tuple[tuple[Any, ...], dict[str, str]]:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None), or a single .json/.yaml file of
    arguments, into instances of ``dataclass_types``.

    ``script_defaults`` may supply defaults of the script's own for the flags the user did not set (typed or
    in the file); a user value equal to transformers' default still counts as set. Returns the instances and
    the script defaults that were applied.
    """
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=HelpFormatter)
    if len(argv) == 1 and argv[0].endswith(ARGUMENT_FILE_SUFFIXES):
        file_arguments = _read_argument_file(argv[0])
        _check_argument_file_keys(argv[0], file_arguments, dataclass_types)
        defaults = script_defaults(set(file_arguments), file_arguments) if script_defaults else {}
        # parse_dict converts nothing, so give the defaults the types the command line would produce.
        typed_defaults = {key: _typed(parser, key, value) for key, value in defaults.items()}
        return tuple(parser.parse_dict({**typed_defaults, **file_arguments})), defaults
    if script_defaults is None:
        return tuple(parser.parse_args_into_dataclasses(args=argv)), {}
    # First parse: validates the command line (and answers --help, with the real defaults).
    parsed = parser.parse_args_into_dataclasses(args=argv)
    values = {key: value for instance in parsed for key, value in vars(instance).items()}
    defaults = script_defaults(_explicit_cli_dests(parser, argv), values)
    # The defaults come first, so that nothing the user typed can be overridden by them.
    default_flags = [token for key, value in defaults.items() for token in (f"--{key}", value)]
    return tuple(parser.parse_args_into_dataclasses(args=default_flags + argv)), defaults


def _check_argument_file_keys(name: str, arguments: dict[str, Any], dataclass_types: Sequence[type]) -> None:
    """A key of an arguments file that no flag has (a typo) is an error naming the file, the key and the
    closest flags, as the command line does, instead of transformers' bare list of unused keys."""
    known = {field.name for dataclass_type in dataclass_types for field in dataclasses.fields(dataclass_type)}
    unknown = sorted(key for key in arguments if key not in known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{name}: unknown argument(s) {', '.join(hints)}; `--help` lists every flag.")


def _read_argument_file(name: str) -> dict[str, Any]:
    path = os.path.abspath(name)
    if not os.path.isfile(path):
        raise ValueError(f"Arguments file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            arguments = json.load(f)
        else:
            import yaml  # only argument files need pyyaml

            arguments = yaml.safe_load(f) or {}
    if not isinstance(arguments, dict):
        raise ValueError(f"Arguments file {path!r} must hold a mapping of argument names to values.")
    return arguments


def _explicit_cli_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names of the arguments present on the command line, whatever their value.

    Parses ``argv`` again with every default replaced by ``argparse.SUPPRESS``, so that only the arguments
    the user typed reach the namespace: this tells "left at the default" from "set to a value equal to the
    default", which comparing values cannot.
    """
    saved = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved.items():
            action.default = default
    return set(vars(namespace))


def _typed(parser: argparse.ArgumentParser, dest: str, value: str) -> Any:
    for action in parser._actions:
        if action.dest == dest and action.type is not None:
            return action.type(value)
    return value


def load_hub_or_local(
    load: Callable[..., Any], source: str, flag: str, local_hint: str, *, repo_type: str = "model", **kwargs: Any
) -> Any:
    """``load(source, **kwargs)`` (a ``from_pretrained`` or ``load_dataset``) for the value ``source`` of
    ``flag``, failing fast, naming the flag and ``local_hint``, when it is neither local nor on the Hub."""
    check_hub_reachable_or_local(source, flag, local_hint, repo_type=repo_type, cache_dir=kwargs.get("cache_dir"))
    with hub_load_errors(source, flag, local_hint):
        return load(source, **kwargs)


# What identifies a training run besides its label regularization: the fields, of either script, that
# change the model it starts from or the data it trains on (absent fields are skipped).
_MODEL_IDENTITY_FIELDS = ("model_name_or_path", "model_type", "config_name", "config_overrides", "tokenizer_name",
                          "train_tokenizer_vocab_size", "train_tokenizer_model")
_DATA_IDENTITY_FIELDS = ("dataset_name", "dataset_config_name", "train_dir", "train_file", "train_prefix",
                         "max_train_samples", "train_val_split", "source_lang", "target_lang")
_PATH_FIELDS = {"train_dir", "train_file", "train_prefix"}


def _describe(arguments: Any, fields: Sequence[str]) -> str:
    parts = []
    for name in fields:
        value = getattr(arguments, name, None)
        if value is None:
            continue
        if name in _PATH_FIELDS or (isinstance(value, str) and os.path.exists(value)):
            value = os.path.abspath(value)  # the same data named from another working directory
        parts.append(f"{name}={value}")
    return ", ".join(parts)


def run_identity(model_args: Any, data_args: Any, training_args: Any) -> dict[str, Any]:
    """The run's identity (`labo_hf.run_record`): its label regularization, defaults filled in, and, when it
    trains, the model it starts from and its training data. An evaluation-only run changes no model, so only
    the loss its eval_loss uses identifies it."""
    identity: dict[str, Any] = {
        "label_regularizer": training_args.label_regularizer,
        "label_regularizer_alpha": training_args.resolved_label_regularizer_alpha,
        "labo_temperature": training_args.resolved_labo_temperature,
    }
    if training_args.do_train:
        identity["model"] = _describe(model_args, _MODEL_IDENTITY_FIELDS) or "the script's default model"
        identity["data"] = _describe(data_args, _DATA_IDENTITY_FIELDS) or "the script's default data"
    return identity


def start_run(
    script_logger: logging.Logger,
    training_args: Any,
    applied_defaults: dict[str, str] | None = None,
    *,
    model_args: Any,
    data_args: Any,
) -> tuple[str | None, dict[str, Any]]:
    """Logging, the multi-process launch check, the output folder, the checkpoint to resume from, and the seed.

    --output_dir must be new, empty, or hold this same run (`labo_hf.output_folder.prepare_output_dir`;
    --overwrite_output_dir empties it). Returns the checkpoint for ``trainer.train(resume_from_checkpoint=...)``
    (--resume_from_checkpoint, else the newest complete one in --output_dir when training, else None) and the
    run's identity, for the trainer's ``run_identity``.
    """
    configure_logging(script_logger, training_args)
    if applied_defaults:
        script_logger.info(f"Script defaults applied (flags you did not set): {applied_defaults}")
    check_launch_matches_world_size(training_args)
    if training_args.dataloader_pin_memory and training_args.device.type == "cpu":
        # Pinning only speeds up copies to an accelerator; without one torch ignores it with a UserWarning
        # at every data loader, which reads like a problem to a newcomer running the CPU quick start.
        script_logger.info("No accelerator: --dataloader_pin_memory has no effect and is turned off.")
        training_args.dataloader_pin_memory = False
    identity = run_identity(model_args, data_args, training_args)
    # The process that saves for this filesystem empties and claims the folder before the others look at it.
    with training_args.main_process_first(local=training_args.save_on_each_node, desc="checking --output_dir"):
        prepare_output_dir(training_args.output_dir, identity, overwrite=data_args.overwrite_output_dir,
                           is_main_process=training_args.should_save, logger=script_logger)  # fmt: skip
    checkpoint = resolve_checkpoint(training_args, script_logger)
    if checkpoint is not None:
        check_same_run(
            read_run_record(checkpoint), identity, f"--resume_from_checkpoint={checkpoint!r}",
            "Resume from a checkpoint of this run; to start from its weights alone, pass it as --model_name_or_path.",
        )  # fmt: skip
    # Seeded before any model is created, so that a from-scratch initialization is reproducible.
    set_seed(training_args.seed)
    return checkpoint, identity


def _previous_results(output_dir: str, split: str) -> dict[str, float] | None:
    """The metrics an earlier call saved in ``{split}_results.json`` of `output_dir`, if any."""
    path = os.path.join(output_dir, f"{split}_results.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def train_evaluate_predict(
    trainer: Any,
    *,
    checkpoint: str | None,
    predict_dataset: Any = None,
    eval_kwargs: dict[str, Any] | None = None,
    predict_kwargs: dict[str, Any] | None = None,
    predict_metrics: Callable[..., dict[str, float]] | None = None,
    write_predictions: Callable[[Any], None] | None = None,
    model_card: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The stages after the Trainer is built, as ``--do_train``/``--do_eval``/``--do_predict`` ask.

    Writes ``{train,eval,predict,all}_results.json``, the model with its processing class (reloadable with
    the Auto classes), the model card (with ``model_card``'s keywords; the LABO trainers add the regularizer
    and the paper) or the Hub upload under ``--push_to_hub``. ``predict_metrics`` replaces
    ``compute_metrics`` for the test split; ``write_predictions`` receives ``trainer.predict``'s output on the
    main process. Returns all the metrics.
    """
    args = trainer.args
    all_metrics: dict[str, float] = {}

    def report(split: str, metrics: dict[str, float]) -> None:
        trainer.log_metrics(split, metrics)
        trainer.save_metrics(split, metrics)
        all_metrics.update(metrics)

    if args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # with the tokenizer or image processor, so the folder reloads with Auto classes
        train_metrics = {**train_result.metrics, "train_samples": len(trainer.train_dataset)}
        if getattr(trainer, "resumed_complete_run", False):
            # The rerun of a finished run trained nothing: the results of the run are the ones it wrote then.
            train_metrics = _previous_results(args.output_dir, "train") or train_metrics
        report("train", train_metrics)
        trainer.save_state()
    if args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(metric_key_prefix="eval", **(eval_kwargs or {}))
        report("eval", {**metrics, "eval_samples": len(trainer.eval_dataset)})
    if args.do_predict:
        logger.info("*** Predict ***")
        if predict_metrics is not None:
            trainer.compute_metrics = predict_metrics
        output = trainer.predict(predict_dataset, metric_key_prefix="predict", **(predict_kwargs or {}))
        report("predict", {**(output.metrics or {}), "predict_samples": len(predict_dataset)})
        if write_predictions is not None and trainer.is_world_process_zero():
            write_predictions(output)

    card = {key: value for key, value in (model_card or {}).items() if value is not None}
    if os.path.exists(str(card.get("dataset_tags", ""))):
        # The card's `datasets:` metadata names Hub datasets; a local folder's path means nothing on the Hub.
        del card["dataset_tags"]
    if args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    return all_metrics
