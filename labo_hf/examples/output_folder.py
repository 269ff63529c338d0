"""The example scripts' output folder: used only by the run it belongs to, and nothing deleted that isn't ours.

`prepare_output_dir` decides, before anything is loaded or trained, whether a run may write into
``--output_dir`` (a symlinked folder is resolved first and judged by the same rules):

- a missing or empty folder starts a new run;
- a folder holding a run record (``labo_run.json``) continues that run when the identities match (same
  label regularization, model and training data), and is refused, naming both values, when they differ;
- any other non-empty folder (someone's files, a plain transformers run) is refused, as the transformers
  example scripts did, since the run would overwrite its README.md and merge its all_results.json;
- ``--overwrite_output_dir`` deletes what labo-hf runs wrote there, and nothing else: the entries the run
  record lists (`labo_hf.hf.run_record.read_run_outputs`) and labo-hf's own bookkeeping files. Any other
  entry, or an input of the run (data, model, tokenizer, checkpoint, arguments file) inside the folder, makes
  it refuse before anything is touched. Symlinks are unlinked, never followed.

It also checks that the folder is writable, so that a read-only folder fails now rather than at the final
save after hours of training. `claim_output_dir` writes the run record once every input is loaded, when the
run starts writing: a run that fails before that leaves the folder as it found it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from labo_hf.examples.folder_lock import LOCK_NAME
from labo_hf.hf.run_record import (
    RUN_RECORD_NAME,
    check_same_run,
    read_run_outputs,
    read_run_record,
    write_run_record,
)

__all__ = ["TOKENIZER_STAGING", "check_writable", "claim_output_dir", "clear_folder", "prepare_output_dir"]

# Where a tokenizer trained before the folder is claimed is shared between processes.
TOKENIZER_STAGING = ".labo-trained-tokenizer"
# What labo-hf writes under fixed names before a claim, or transiently: ours by name, record or not.
_OWN_NAMES = {RUN_RECORD_NAME, RUN_RECORD_NAME + ".partial", LOCK_NAME, TOKENIZER_STAGING}
_OWN_PATTERN = re.compile(r"^\.tmp-(replaced-)?checkpoint-\d+$")
_ADVICE = "Choose another --output_dir, or pass --overwrite_output_dir to delete what labo-hf runs wrote there and start over."


def _is_own_by_name(name: str) -> bool:
    return name in _OWN_NAMES or bool(_OWN_PATTERN.match(name))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def check_writable(folder: str, flag: str = "--output_dir") -> None:
    """Create `folder` if needed and prove it writable by creating and removing a file in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".labo-write-test-"):
            pass
    except OSError as err:
        raise ValueError(
            f"{flag}={folder!r} is not writable ({err.strerror or err}); training would fail when saving. "
            f"Choose a writable {flag}."
        ) from err


def _remove(path: str) -> None:
    # A symlink is unlinked, never followed; shutil.rmtree unlinks the symlinks inside a folder too.
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def clear_folder(folder: str, flag: str = "--output_dir", inputs: Mapping[str, str] | None = None) -> int:
    """Delete what labo-hf runs wrote into `folder` (the folder itself stays); return how many entries went.

    Refuses, deleting nothing, a folder that holds the current working directory, an input of the run
    (`inputs`: flag -> path), or any entry its run record does not list as the run's.
    """
    real = os.path.realpath(folder)
    if _inside(os.path.realpath(os.getcwd()), real):
        raise ValueError(
            f"{flag}={folder!r} holds the current working directory; --overwrite_output_dir will not delete it. "
            "Choose a dedicated --output_dir."
        )
    inside = [f"{name}={path}" for name, path in (inputs or {}).items() if _inside(os.path.realpath(path), real)]
    if inside:
        raise ValueError(
            f"--overwrite_output_dir would delete inputs of this very run, which lie inside {flag}={folder!r}: "
            f"{', '.join(inside)}. Nothing was deleted. Move them out of the folder, or choose another {flag}."
        )
    entries = sorted(os.listdir(real))
    ours = set(read_run_outputs(real).get("entries", [])) if os.path.isfile(os.path.join(real, RUN_RECORD_NAME)) else set()
    foreign = [name for name in entries if name not in ours and not _is_own_by_name(name)]
    if foreign:
        raise ValueError(
            f"{flag}={folder!r} holds {len(foreign)} {'entry' if len(foreign) == 1 else 'entries'} that no labo-hf "
            f"run recorded writing ({_shown(foreign)}); --overwrite_output_dir deletes only what labo-hf runs wrote "
            f"(listed in {RUN_RECORD_NAME}), so it deleted nothing. Move those entries away, or choose another "
            f"{flag}."
        )
    if entries:
        check_writable(real, flag)  # a read-only mount is said as such, before anything is deleted
    doomed = [name for name in entries if name != LOCK_NAME]  # the lock is held by this very run
    for name in doomed:
        _remove(os.path.join(real, name))
    return len(doomed)


def prepare_output_dir(
    output_dir: str,
    identity: Mapping[str, Any],
    *,
    overwrite: bool,
    is_main_process: bool,
    logger: Any = None,
    inputs: Mapping[str, str] | None = None,
) -> bool:
    """Check (and, on the main process, prepare) `output_dir` for a run identified by `identity`.

    Returns True when the folder already belongs to this run (a resumable continuation), False for a new
    run. Every process checks; only the main one deletes (``overwrite``; `clear_folder` with `inputs`, the
    run's input paths by flag), so the caller must let the main process finish first (e.g.
    ``training_args.main_process_first()``). Writes no run record: `claim_output_dir` does, once training
    starts. Raises ``ValueError`` for a foreign or mismatched non-empty folder, and for an unwritable one.
    """
    real = os.path.realpath(output_dir)
    entries = sorted(os.listdir(real)) if os.path.isdir(real) else []
    foreign = [name for name in entries if not _is_own_by_name(name)]
    recorded = read_run_record(real) if entries else None
    continuing = False
    if entries and overwrite:
        if is_main_process:
            removed = clear_folder(output_dir, inputs=inputs)
            if logger is not None:
                logger.warning(f"--overwrite_output_dir: deleted the {removed} entries earlier runs wrote in {output_dir}.")
    elif foreign and recorded is None:
        raise ValueError(
            f"--output_dir={output_dir!r} is not empty ({len(foreign)} {'entry' if len(foreign) == 1 else 'entries'}: "
            f"{_shown(foreign)}) and holds no labo-hf run record ({RUN_RECORD_NAME}), so it is not a run of this "
            f"script: writing into it would overwrite or merge its files. {_ADVICE}"
        )
    elif recorded is not None:
        check_same_run(recorded, identity, f"--output_dir={output_dir!r}", _ADVICE)
        continuing = True
    if is_main_process:
        check_writable(output_dir)
    return continuing


def claim_output_dir(output_dir: str, identity: Mapping[str, Any]) -> None:
    """Write the run record into `output_dir` (keeping the outputs an earlier call of this run recorded)."""
    write_run_record(os.path.realpath(output_dir), identity)
