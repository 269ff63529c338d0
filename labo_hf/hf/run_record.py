"""The identity of a training run, recorded next to what it produces.

A run is identified by its label regularization (regularizer, alpha, T, defaults filled in) and, when the
caller knows them, by the model it starts from and the training data. The record is a small JSON file,
``labo_run.json``, written into every checkpoint and model folder a LABO trainer saves and into the
example scripts' output folders. Resuming, or reusing an output folder, with a different identity would
mix two methods in one run, so it is refused with both values named.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "RUN_RECORD_NAME",
    "check_same_run",
    "identity_differences",
    "read_run_record",
    "write_run_record",
]

RUN_RECORD_NAME = "labo_run.json"

# How each identity key is named to the user: the command-line flag that sets it.
_FLAGS = {
    "label_regularizer": "--label_regularizer",
    "label_regularizer_alpha": "--label_regularizer_alpha",
    "labo_temperature": "--labo_temperature",
}


def write_run_record(folder: str, identity: Mapping[str, Any]) -> None:
    """Write `identity` to ``folder/labo_run.json`` (whole or not at all: written aside, then renamed)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN_RECORD_NAME)
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump(dict(identity), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".partial", path)


def read_run_record(folder: str) -> dict[str, Any] | None:
    """The identity recorded in `folder`, or None when it holds no record."""
    path = os.path.join(folder, RUN_RECORD_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable run record ({err}); delete it or the folder.") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a run record must be a JSON object; got {type(record).__name__}.")
    return record


def identity_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per key both identities hold with different values, naming both values.

    Keys only one side holds are not compared: a checkpoint saved by a plain `LABOTrainer` knows its label
    regularization but not which data set the calling code used.
    """
    lines = []
    for key in sorted(recorded.keys() & current.keys()):
        if recorded[key] != current[key]:
            name = _FLAGS.get(key, key)
            lines.append(f"{name}: {current[key]!r} now, {recorded[key]!r} in the recorded run")
    return lines


def check_same_run(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], where: str, advice: str) -> None:
    """Raise ``ValueError`` when `recorded` (the record found at `where`) differs from `current`.

    `advice` ends the message: what the user can do instead.
    """
    if recorded is None:
        return
    differences = identity_differences(recorded, current)
    if differences:
        raise ValueError(
            f"{where} belongs to another run: " + "; ".join(differences) + f". Continuing it would mix two "
            f"methods in one run. {advice}"
        )
