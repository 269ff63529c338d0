"""Checkpoint folders that are complete or absent, and finding the one to resume from.

A checkpoint is written into a staging folder ``.tmp-checkpoint-N`` next to the final one and renamed to
``checkpoint-N`` only once every process has written its files, with a manifest (each file's size) written
last. A process killed mid-save (preemption, out-of-memory kill, full disk) then leaves at most a staging
folder, which no resume picks up: transformers' ``get_last_checkpoint`` and checkpoint rotation only see
``checkpoint-*`` names.

Checkpoints written elsewhere (plain transformers, older labo-hf) carry no manifest; they count as complete
when they hold a trainer state and model weights, which is what resuming reads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

__all__ = [
    "MANIFEST_NAME",
    "STAGING_PREFIX",
    "check_checkpoint_complete",
    "checkpoint_problems",
    "find_last_complete_checkpoint",
    "publish_checkpoint",
]

MANIFEST_NAME = "labo_checkpoint_manifest.json"
# A leading dot keeps staging folders out of transformers' `checkpoint-*` globs and regexes.
STAGING_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR naming
_TRAINER_STATE = "trainer_state.json"
# Weights as transformers, PEFT, FSDP (pytorch_model_fsdp*) and DeepSpeed (global_step*) save them.
_WEIGHT_PREFIXES = ("model.", "model-", "pytorch_model", "adapter_model", "global_step")


def _files_with_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            sizes[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    sizes.pop(MANIFEST_NAME, None)
    return sizes


def _fsync_folder(folder: str) -> None:
    # Makes a rename durable across a power loss on POSIX filesystems; not possible (nor needed) on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_checkpoint(staged: str, final: str) -> None:
    """Write the manifest of the complete folder `staged`, then rename it to `final`.

    Called by one process per filesystem after every process has finished writing into `staged`. An existing
    `final` (a step saved again) is replaced; it is moved aside first, so that a crash in between leaves one
    complete copy on disk rather than none.
    """
    manifest = {"format": 1, "files": _files_with_sizes(staged)}
    manifest_path = os.path.join(staged, MANIFEST_NAME)
    with open(manifest_path + ".partial", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(manifest_path + ".partial", manifest_path)
    parent = os.path.dirname(os.path.abspath(final))
    previous = None
    if os.path.exists(final):
        previous = os.path.join(parent, f"{STAGING_PREFIX}replaced-{os.path.basename(final)}")
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(staged, final)
    _fsync_folder(parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def checkpoint_problems(folder: str) -> list[str]:
    """What makes `folder` unusable as a checkpoint to resume from; empty when it is complete.

    With a manifest: every listed file must exist with its recorded size. Without one: a trainer state and
    model weights must be present.
    """
    if not os.path.isdir(folder):
        return ["the folder itself (it does not exist)"]
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                expected: dict[str, int] = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return [f"{MANIFEST_NAME} (unreadable: {err})"]
        found = _files_with_sizes(folder)
        problems = []
        for name, size in sorted(expected.items()):
            if name not in found:
                problems.append(name)
            elif found[name] != size:
                problems.append(f"{name} (truncated or changed: {found[name]} bytes, {size} when saved)")
        return problems
    entries = os.listdir(folder)
    problems = [] if _TRAINER_STATE in entries else [_TRAINER_STATE]
    if not any(entry.startswith(_WEIGHT_PREFIXES) for entry in entries):
        problems.append("model weights (model.safetensors or pytorch_model.bin, or their shards)")
    return problems


def check_checkpoint_complete(folder: str, flag: str = "--resume_from_checkpoint") -> None:
    """Raise ``ValueError`` naming `flag` and the missing or damaged files when `folder` is not a complete
    checkpoint."""
    problems = checkpoint_problems(folder)
    if problems:
        raise ValueError(
            f"{flag}={folder!r} is not a complete checkpoint (an interrupted save, or files removed since): "
            f"missing or damaged: {', '.join(problems)}. Resume from an earlier checkpoint-* folder."
        )


def find_last_complete_checkpoint(output_dir: str, logger: Any = None) -> str | None:
    """The complete ``checkpoint-N`` folder of `output_dir` with the largest N, or None.

    Incomplete checkpoints with a larger N, and staging folders of interrupted saves, are skipped with a
    warning naming them (through `logger`, a `logging.Logger`, when given).
    """
    if not os.path.isdir(output_dir):
        return None
    log = logger or logging.getLogger(__name__)
    entries = os.listdir(output_dir)
    steps = sorted(
        ((int(match.group(1)), name) for name in entries if (match := _CHECKPOINT_RE.match(name))), reverse=True
    )
    chosen = None
    skipped = []
    for _, name in steps:
        path = os.path.join(output_dir, name)
        if not os.path.isdir(path):
            continue
        problems = checkpoint_problems(path)
        if not problems:
            chosen = path
            break
        skipped.append(f"{name} (missing or damaged: {', '.join(problems)})")
    interrupted = sorted(name for name in entries if name.startswith(f"{STAGING_PREFIX}checkpoint-"))
    if skipped:
        log.warning(
            f"Skipping incomplete checkpoints in {output_dir}: {'; '.join(skipped)}. "
            + (f"Resuming from {os.path.basename(chosen)} instead." if chosen else "No complete checkpoint is left.")
        )
    if interrupted:
        log.warning(f"Ignoring the unfinished checkpoint saves {', '.join(interrupted)} in {output_dir}.")
    return chosen
