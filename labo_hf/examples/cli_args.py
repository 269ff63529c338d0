"""The example scripts' arguments: the fields both scripts share, one field with its help, and parsing flags or one
.json/.yaml file of them (a typo'd key names the closest flag)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import os
import pathlib
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

__all__ = [
    "ExampleDataArguments",
    "ExampleModelArguments",
    "HelpFormatter",
    "apply_config_overrides",
    "argument",
    "order_help",
    "parse_args",
]

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
            "help": "Delete what earlier labo-hf runs wrote in --output_dir (the entries its labo_run.json lists) "
            "and start a new run there; if the folder holds anything else, or an input of this run, nothing is "
            "deleted and the run is refused. Without it, a non-empty --output_dir must hold this same run (same "
            "regularizer, alpha, T, model and training data), which resumes from its newest intact checkpoint; "
            "any other non-empty folder is refused."
        },
    )

    def __post_init__(self) -> None:
        if self.dataset_config_name is not None and self.dataset_name is None:
            raise ValueError("--dataset_config_name needs --dataset_name.")
        for flag in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be at least 1, got {value}.")


def apply_config_overrides(config: Any, overrides: str) -> None:
    """Apply --config_overrides ("key=value,...") to a from-scratch `config`; a key the config lacks (a typo) or
    a value of the wrong type is a ``ValueError`` naming the flag."""
    try:
        config.update_from_string(overrides)
    except ValueError as err:
        raise ValueError(f"--config_overrides={overrides!r}: {err}") from err


def _check_counts(instances: Sequence[Any]) -> None:
    # transformers divides by it deep inside training (ZeroDivisionError) instead of refusing it up front.
    for instance in instances:
        steps = getattr(instance, "gradient_accumulation_steps", 1)
        if isinstance(steps, int) and steps < 1:
            raise ValueError(f"--gradient_accumulation_steps must be at least 1, got {steps}.")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the script's docstring verbatim (its commands stay copy-pasteable) and every default."""


# The usage line: the full one lists every flag (hundreds), pushing the script's own flags far down --help.
USAGE = "%(prog)s [-h] [--flag value ...]  |  %(prog)s ARGUMENTS.json|ARGUMENTS.yaml"

# The --help sections, in the order a user needs them.
SCRIPT_FLAGS = "the script's flags (model and data)"
LABO_FLAGS = "label regularization (LABO)"
TRAINING_FLAGS = "training flags (transformers TrainingArguments)"


def order_help(parser: argparse.ArgumentParser, dataclass_types: Sequence[type]) -> None:
    """Make --help list the script's own flags first, then LABO's, then the hundreds of transformers' training
    flags (HfArgumentParser lists them in field order, LABO's last, after the TrainingArguments ones).

    Only the help changes: parsing reads ``parser._actions``, whose order stays."""
    script, labo, training = set(), set(), set()
    for dataclass_type in dataclass_types:
        names = {f.name for f in dataclasses.fields(dataclass_type)}
        if not issubclass(dataclass_type, TrainingArguments):
            script |= names
            continue
        # The transformers class the script's arguments extend: what it adds on top is LABO's.
        base = next(c for c in dataclass_type.__mro__ if c.__module__.startswith("transformers."))
        inherited = {f.name for f in dataclasses.fields(base)}
        labo |= names - inherited
        training |= inherited
    groups = [(parser.add_argument_group(title), dests) for title, dests in
              ((SCRIPT_FLAGS, script | {"help"}), (LABO_FLAGS, labo), (TRAINING_FLAGS, training))]
    for action in list(parser._optionals._group_actions):
        for group, dests in groups:
            if action.dest in dests:
                parser._optionals._group_actions.remove(action)
                group._group_actions.append(action)
                break
    if not parser._optionals._group_actions:
        parser._action_groups.remove(parser._optionals)


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
    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=HelpFormatter, usage=USAGE)
    order_help(parser, dataclass_types)
    if len(argv) == 1 and argv[0].endswith(ARGUMENT_FILE_SUFFIXES):
        file_arguments = _read_argument_file(argv[0])
        _check_argument_file_keys(argv[0], file_arguments, dataclass_types)
        _check_argument_file_types(argv[0], file_arguments, dataclass_types)
        defaults = script_defaults(set(file_arguments), file_arguments) if script_defaults else {}
        # parse_dict converts nothing, so give the defaults the types the command line would produce.
        typed_defaults = {key: _typed(parser, key, value) for key, value in defaults.items()}
        instances = tuple(parser.parse_dict({**typed_defaults, **file_arguments}))
        _check_counts(instances)
        for instance in instances:
            if isinstance(instance, ExampleDataArguments):
                # An input of the run: --overwrite_output_dir must not delete it (`runtime.run_inputs`).
                instance.argument_file = os.path.abspath(argv[0])
        return instances, defaults
    if script_defaults is None:
        instances = tuple(parser.parse_args_into_dataclasses(args=argv))
        _check_counts(instances)
        return instances, {}
    # First parse: validates the command line (and answers --help, with the real defaults).
    parsed = parser.parse_args_into_dataclasses(args=argv)
    values = {key: value for instance in parsed for key, value in vars(instance).items()}
    defaults = script_defaults(_explicit_cli_dests(parser, argv), values)
    # The defaults come first, so that nothing the user typed can be overridden by them.
    default_flags = [token for key, value in defaults.items() for token in (f"--{key}", value)]
    instances = tuple(parser.parse_args_into_dataclasses(args=default_flags + argv))
    _check_counts(instances)
    return instances, defaults


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


def _matches(value: Any, expected: Any) -> bool:
    """Whether a value read from a .json/.yaml file has the type `expected` (a field's annotation), as the
    command line would have produced it: a bool is true/false (never the string "false"), a number is not
    a bool, a string is not a number."""
    if expected is Any:
        return True
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in args)
    if origin is typing.Literal:
        return value in args
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected in (str, pathlib.Path):
        return isinstance(value, str)
    if isinstance(expected, type) and issubclass(expected, enum.Enum):
        return value in {member.value for member in expected} or isinstance(value, expected)
    if origin in (list, tuple, Sequence) or expected in (list, tuple):
        return isinstance(value, list) and all(_matches(item, args[0]) for item in value) if args else isinstance(value, list)
    if origin is dict or expected is dict:
        return isinstance(value, dict)
    return True  # a class no file value can be (e.g. a config object): left to the dataclass itself


def _describe_type(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe_type(member) for member in args))
    if expected is bool:
        return "a bool (true or false, unquoted)"
    if expected is type(None):
        return "null"
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in args)
    if isinstance(expected, type) and issubclass(expected, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in expected)
    if origin in (list, tuple, Sequence):
        return f"a list of {_describe_type(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", str: "a string", pathlib.Path: "a string", dict: "a mapping"}.get(
        expected, getattr(expected, "__name__", str(expected))
    )


def _check_argument_file_types(name: str, arguments: dict[str, Any], dataclass_types: Sequence[type]) -> None:
    """Every value of an arguments file has its flag's type, or a ``ValueError`` names the file, the key, the
    value and the type expected (``"overwrite_output_dir": "false"`` is a string, and a true one)."""
    for dataclass_type in dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        for item in dataclasses.fields(dataclass_type):
            if item.name in arguments and not _matches(arguments[item.name], hints.get(item.name, Any)):
                value = arguments[item.name]
                raise ValueError(
                    f"{name}: {item.name!r} is {value!r} ({type(value).__name__}), but --{item.name} takes "
                    f"{_describe_type(hints[item.name])}. Write the value as that type (e.g. true/false for a "
                    "flag, a quoted string for text)."
                )


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


