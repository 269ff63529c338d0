"""Checkpoint folders that are complete or absent, and finding the one to resume from.

A checkpoint is written into a staging folder ``.tmp-checkpoint-N`` next to the final one and renamed to
``checkpoint-N`` only once every process has written its files, with a manifest (each file's size and
SHA-256 content hash) written last. A process killed mid-save (preemption, out-of-memory kill, full disk) then leaves at most a staging
folder, which no resume picks up: transformers' ``get_last_checkpoint`` and checkpoint rotation only see
``checkpoint-*`` names.

Resuming verifies the content of the checkpoint it picks: a file whose bytes differ from what was saved (a
bit flip, a file overwritten in place) is named, and ``resume_from_checkpoint=True`` falls back to the newest
intact checkpoint. Checkpoints written elsewhere (plain transformers, older labo-hf) carry no manifest; they
count as complete when they hold a trainer state and model weights, and `checkpoint_load_problems` names
what in them cannot be read, without loading anything.

SHA-256 rather than BLAKE2b: with the SHA extensions of current x86 and ARM CPUs hashlib's sha256 streams
about twice as fast (bench/checkpoint_hash_cost.py measures the cost against the save itself).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import zipfile
from typing import Any

from labo_hf.hf.safe_files import write_new_file

__all__ = [
    "MANIFEST_NAME",
    "STAGING_PREFIX",
    "add_content_hashes",
    "hash_in_background",
    "check_checkpoint_complete",
    "checkpoint_load_problems",
    "checkpoint_problems",
    "file_digest",
    "find_last_complete_checkpoint",
    "publish_checkpoint",
    "unloadable_checkpoint_error",
]

MANIFEST_NAME = "labo_checkpoint_manifest.json"
# A leading dot keeps staging folders out of transformers' `checkpoint-*` globs and regexes.
STAGING_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR naming
_TRAINER_STATE = "trainer_state.json"
# Weights as transformers, PEFT, FSDP (pytorch_model_fsdp*) and DeepSpeed (global_step*) save them.
_WEIGHT_PREFIXES = ("model.", "model-", "pytorch_model", "adapter_model", "global_step")
DIGEST = "sha256"
_CHUNK = 1 << 20
# Content checks already passed in this process, by (folder, manifest mtime): the scripts and the trainer
# both check the checkpoint they resume from, and hashing it twice would double the cost.
_VERIFIED: set[tuple[str, int]] = set()


def file_digest(path: str) -> str:
    """The SHA-256 of the file at `path`, read in 1 MiB chunks (constant memory, whatever the size)."""
    digest = hashlib.new(DIGEST)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def _write_manifest(folder: str, files: dict[str, dict[str, Any]]) -> None:
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    text = json.dumps({"format": 2, "files": files}, indent=1, sort_keys=True)
    write_new_file(manifest_path + ".partial", text, fsync=True)
    os.replace(manifest_path + ".partial", manifest_path)


def publish_checkpoint(staged: str, final: str, *, hash_now: bool = True) -> None:
    """Write the manifest of the complete folder `staged`, then rename it to `final`.

    Called by one process per filesystem after every process has finished writing into `staged`. An existing
    `final` (a step saved again) is replaced; it is moved aside first, so that a crash in between leaves one
    complete copy on disk rather than none. With ``hash_now=False`` the manifest holds the sizes only, and
    `add_content_hashes` adds the hashes later (the trainers run it in a background thread: hashing costs
    about twice the save itself, which would otherwise stall training at every checkpoint).
    """
    files: dict[str, dict[str, Any]] = {name: {"size": size} for name, size in _files_with_sizes(staged).items()}
    if hash_now:
        for name, entry in files.items():
            entry[DIGEST] = file_digest(os.path.join(staged, name))
    _write_manifest(staged, files)
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


def add_content_hashes(folder: str) -> bool:
    """Add the content hash of every file to the manifest of the published checkpoint `folder`.

    Returns False, changing nothing, when the folder has gone (rotated away) or a file changed size since it
    was published: the hashes must describe what was saved.
    """
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
            files: dict[str, dict[str, Any]] = json.load(f)["files"]
        for name, entry in files.items():
            path = os.path.join(folder, name)
            if os.path.getsize(path) != entry["size"]:
                return False
            entry[DIGEST] = file_digest(path)
        _write_manifest(folder, files)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def hash_in_background(folder: str) -> threading.Thread:
    """Start `add_content_hashes(folder)` in a thread (hashlib releases the GIL while hashing); join it before
    the process ends, or the checkpoint keeps a manifest of sizes only."""
    thread = threading.Thread(target=add_content_hashes, args=(folder,), name="labo-checkpoint-hashes", daemon=True)
    thread.start()
    return thread


def checkpoint_problems(folder: str, verify_content: bool = False) -> list[str]:
    """What makes `folder` unusable as a checkpoint to resume from; empty when it is complete.

    With a manifest: every listed file must exist with its recorded size and, with `verify_content`, its
    recorded content hash (manifests of older labo-hf carry sizes only). Without one: a trainer state and
    model weights must be present.
    """
    if not os.path.isdir(folder):
        return ["the folder itself (it does not exist)"]
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                expected: dict[str, Any] = json.load(f)["files"]
            expected = {name: entry if isinstance(entry, dict) else {"size": int(entry)}
                        for name, entry in expected.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return [f"{MANIFEST_NAME} (unreadable: {err})"]
        found = _files_with_sizes(folder)
        problems = []
        for name, entry in sorted(expected.items()):
            if name not in found:
                problems.append(name)
            elif found[name] != entry.get("size"):
                problems.append(f"{name} (truncated or changed: {found[name]} bytes, {entry.get('size')} when saved)")
        key = (os.path.realpath(folder), os.stat(manifest_path).st_mtime_ns)
        if problems or not verify_content or key in _VERIFIED:
            return problems
        for name, entry in sorted(expected.items()):
            if DIGEST not in entry:
                continue
            try:
                same = file_digest(os.path.join(folder, name)) == entry[DIGEST]
            except OSError as err:
                problems.append(f"{name} (unreadable: {err.strerror or err})")
                continue
            if not same:
                problems.append(f"{name} (content differs from what was saved)")
        if not problems:
            _VERIFIED.add(key)
        return problems
    entries = os.listdir(folder)
    problems = [] if _TRAINER_STATE in entries else [_TRAINER_STATE]
    if not any(entry.startswith(_WEIGHT_PREFIXES) for entry in entries):
        problems.append("model weights (model.safetensors or pytorch_model.bin, or their shards)")
    return problems


def checkpoint_load_problems(folder: str) -> list[str]:
    """The files of a checkpoint without a manifest (plain transformers) that could not be loaded, found without
    unpickling anything: a trainer state that is not JSON, safetensors files whose header does not parse, and
    torch files (zip archives) failing their CRC check. Files whose content hash the manifest holds are left to
    that stronger check (`checkpoint_problems`)."""
    hashed = set()
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
            hashed = {name for name, entry in json.load(f)["files"].items() if DIGEST in entry}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    problems = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name in hashed:
            continue
        try:
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            elif name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    f.keys()
            elif name.endswith((".pt", ".pth", ".bin")):
                with open(path, "rb") as f:
                    legacy_pickle = f.read(1) == b"\x80"  # torch's pre-1.6 format: not a zip archive
                if not legacy_pickle:
                    with zipfile.ZipFile(path) as archive:
                        if archive.testzip() is not None:
                            raise ValueError("a CRC check failed")
        except Exception as err:  # noqa: BLE001 - any failure to parse means the file cannot be loaded
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            problems.append(f"{name} (unreadable: {reason})")
    return problems


def unloadable_checkpoint_error(folder: str, err: BaseException) -> ValueError:
    """The ``ValueError`` for a checkpoint whose files passed the checks above but failed to load. torch's advice
    to retry with ``weights_only=False`` (which runs whatever code a tampered file holds) is never passed on."""
    text = str(err).strip()
    if "weights_only" in text or "weights only" in text.lower():
        reason = "it holds objects that torch does not load safely"
    else:
        reason = (text.splitlines()[0][:200] if text else "") or type(err).__name__
    return ValueError(
        f"Checkpoint {folder!r} could not be loaded ({reason}): it is damaged, or was not written by this training "
        "setup. Resume from an earlier checkpoint-* folder, or start a new run."
    )


def check_checkpoint_complete(folder: str, flag: str = "--resume_from_checkpoint") -> None:
    """Raise ``ValueError`` naming `flag` and the missing or damaged files when `folder` is not a complete
    checkpoint."""
    problems = checkpoint_problems(folder, verify_content=True) or checkpoint_load_problems(folder)
    if problems:
        named = "; ".join(f"{os.path.basename(os.path.normpath(folder))}/{problem}" for problem in problems)
        raise ValueError(
            f"{flag}={folder!r} is not a complete checkpoint (an interrupted save, a damaged disk, or files "
            f"removed or changed since): missing or damaged: {', '.join(problems)} ({named}). Resume from an "
            "earlier checkpoint-* folder."
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
        problems = checkpoint_problems(path, verify_content=True) or checkpoint_load_problems(path)
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
