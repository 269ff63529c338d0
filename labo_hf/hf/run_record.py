"""The identity of a training run, recorded next to what it produces.

A run is identified by its label regularization (regularizer, alpha, T, defaults filled in) and, when the
caller knows them, by the model it starts from and the training data. The record is a small JSON file,
``labo_run.json``, written into every checkpoint and model folder a LABO trainer saves and into the
example scripts' output folders. Resuming, or reusing an output folder, with a different identity would
mix two methods in one run, so it is refused with both values named.

In an output folder the record also lists, under ``"labo_hf_outputs"``, the entries the run created there
(checkpoints, weights, tokenizer, results, card) and the run's training results, saved as soon as training
ends so that an interrupted final save loses none of them. ``--overwrite_output_dir`` deletes those entries
and nothing else (`labo_hf.examples.output_folder`). The record is written aside, without following
symlinks, and renamed into place (`labo_hf.hf.safe_files`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from labo_hf.hf.safe_files import raise_if_disk_full, write_new_file

__all__ = [
    "RUN_RECORD_NAME",
    "add_run_outputs",
    "check_same_run",
    "identity_differences",
    "read_run_outputs",
    "read_run_record",
    "recording_new_entries",
    "write_run_record",
]

RUN_RECORD_NAME = "labo_run.json"
_OUTPUTS_KEY = "labo_hf_outputs"  # bookkeeping, not identity: never compared between runs

# How each identity key is named to the user: the command-line flag that sets it.
_FLAGS = {
    "label_regularizer": "--label_regularizer",
    "label_regularizer_alpha": "--label_regularizer_alpha",
    "labo_temperature": "--labo_temperature",
}


def write_run_record(folder: str, identity: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> None:
    """Write `identity` (and `outputs`, the bookkeeping of `add_run_outputs`) to ``folder/labo_run.json``, whole
    or not at all: written aside, never through a symlink, then renamed. The outputs already recorded there
    are kept when `outputs` is None."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN_RECORD_NAME)
    if outputs is None and os.path.isfile(path):
        outputs = read_run_outputs(folder) or None
    record = {**dict(identity), **({_OUTPUTS_KEY: dict(outputs)} if outputs else {})}
    write_new_file(path + ".partial", json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(path + ".partial", path)


def _read(folder: str) -> dict[str, Any] | None:
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


def read_run_record(folder: str) -> dict[str, Any] | None:
    """The identity recorded in `folder`, or None when it holds no record."""
    record = _read(folder)
    if record is not None:
        record.pop(_OUTPUTS_KEY, None)
    return record


def read_run_outputs(folder: str) -> dict[str, Any]:
    """What the record of `folder` says the run wrote there: ``entries`` (names of the folder's entries the run
    created) and ``train_metrics``; empty when there is no record, or an older one without this bookkeeping."""
    outputs = (_read(folder) or {}).get(_OUTPUTS_KEY)
    return dict(outputs) if isinstance(outputs, dict) else {}


def add_run_outputs(folder: str, entries: Any = (), train_metrics: Mapping[str, Any] | None = None) -> None:
    """Add `entries` (names inside `folder`) to the entries its run record lists, and store `train_metrics`.

    Does nothing when `folder` holds no record: only a claimed folder keeps this bookkeeping.
    """
    identity = read_run_record(folder)
    if identity is None:
        return
    outputs = read_run_outputs(folder)
    known = set(outputs.get("entries", []))
    new = {name for name in entries if "/" not in name and name not in known}
    if not new and train_metrics is None:
        return
    outputs["entries"] = sorted(known | new)
    if train_metrics is not None:
        outputs["train_metrics"] = dict(train_metrics)
    write_run_record(folder, identity, outputs)


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


@contextmanager
def recording_new_entries(folder: str, enabled: bool = True) -> Iterator[None]:
    """Record in the run record of `folder` the entries that appear there while the block runs (what the run
    writes). When the block fails, those entries are removed instead (a partial save), and a full disk is said
    as such (`labo_hf.hf.safe_files.raise_if_disk_full`)."""
    if not enabled:
        yield
        return
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    try:
        yield
    except BaseException as err:
        for name in sorted(set(os.listdir(folder)) - before if os.path.isdir(folder) else ()):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with suppress(OSError):
                    os.unlink(path)
        raise_if_disk_full(err, folder, f"the run's outputs into {folder}")
        raise
    add_run_outputs(folder, set(os.listdir(folder)) - before)
