"""The example scripts' output folder: used only by the run it belongs to.

`prepare_output_dir` decides, before anything is loaded or trained, whether a run may write into
``--output_dir``:

- a missing or empty folder starts a new run;
- a folder holding a run record (``labo_run.json``) continues that run when the identities match (same
  label regularization, model and training data), and is refused, naming both values, when they differ;
- any other non-empty folder (someone's files, a plain transformers run) is refused, as the transformers
  example scripts did, since the run would overwrite its README.md and merge its all_results.json;
- ``--overwrite_output_dir`` deletes the folder's contents and starts a new run.

It also checks that the folder is writable, so that a read-only folder fails now rather than at the final
save after hours of training.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from labo_hf.hf.run_record import RUN_RECORD_NAME, check_same_run, read_run_record, write_run_record

__all__ = ["check_writable", "clear_folder", "prepare_output_dir"]

_ADVICE = "Choose another --output_dir, or pass --overwrite_output_dir to delete its contents and start over."


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


def clear_folder(folder: str, flag: str = "--output_dir") -> int:
    """Delete everything inside `folder` (the folder itself stays); return how many entries went.

    Refuses a folder that holds the current working directory or a git repository: deleting those is never
    what ``--overwrite_output_dir`` was meant for.
    """
    real = os.path.realpath(folder)
    cwd = os.path.realpath(os.getcwd())
    if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep) or os.path.exists(os.path.join(real, ".git")):
        raise ValueError(
            f"{flag}={folder!r} holds the current working directory or a git repository; "
            "--overwrite_output_dir will not delete it. Choose a dedicated --output_dir."
        )
    entries = os.listdir(folder)
    for name in entries:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return len(entries)


def prepare_output_dir(
    output_dir: str,
    identity: Mapping[str, Any],
    *,
    overwrite: bool,
    is_main_process: bool,
    logger: Any = None,
) -> bool:
    """Check (and, on the main process, prepare) `output_dir` for a run identified by `identity`.

    Returns True when the folder already belongs to this run (a resumable continuation), False for a new
    run. Every process checks; only the main one deletes (``overwrite``) and writes the run record, so the
    caller must let the main process finish first (e.g. ``training_args.main_process_first()``).
    Raises ``ValueError`` for a foreign or mismatched non-empty folder, and for an unwritable one.
    """
    entries = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    recorded = read_run_record(output_dir) if entries else None
    continuing = False
    if entries and overwrite:
        if is_main_process:
            removed = clear_folder(output_dir)
            if logger is not None:
                logger.warning(f"--overwrite_output_dir: deleted the {removed} entries of {output_dir}.")
    elif entries and recorded is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"--output_dir={output_dir!r} is not empty ({len(entries)} {'entry' if len(entries) == 1 else 'entries'}: {shown}) and holds no labo-hf "
            f"run record ({RUN_RECORD_NAME}), so it is not a run of this script: writing into it would "
            f"overwrite or merge its files. {_ADVICE}"
        )
    elif entries:
        check_same_run(recorded, identity, f"--output_dir={output_dir!r}", _ADVICE)
        continuing = True
    if is_main_process:
        check_writable(output_dir)
        write_run_record(output_dir, identity)
    return continuing
