"""One run per output folder at a time: an exclusive lock on ``OUTPUT_DIR/.labo_run.lock``.

The lock is an ``fcntl.flock`` on that file, held by the process that saves (the main one) for the run's
life. The kernel releases it when the process ends, however it ends (SIGKILL included), so a lock left by a
dead process never blocks the next run. The holder writes its PID and host into the file, so that a second
run is refused naming the process to wait for.

Why not the `filelock` package (installed with huggingface_hub): its Unix lock opens the file with
``O_TRUNC`` before trying to lock it, so every refused contender would erase the holder's PID, which the
refusal is meant to name. Without ``fcntl`` (Windows) no lock is taken, with a warning.
"""

from __future__ import annotations

import os
import socket
import warnings

__all__ = ["LOCK_NAME", "lock_output_dir", "unlock_output_dir"]

LOCK_NAME = ".labo_run.lock"
_HELD: dict[str, int] = {}  # real lock-file path -> the open file descriptor holding its flock


def _lock_path(folder: str) -> str:
    return os.path.join(os.path.realpath(folder), LOCK_NAME)


def _still_ours(path: str, fd: int) -> bool:
    # The folder may have been deleted and made again since: the lock then belongs to a file gone.
    try:
        return os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        return False


def lock_output_dir(folder: str, flag: str = "--output_dir") -> bool:
    """Take the run lock of `folder` (created if needed) for this process, or raise ``ValueError`` naming the
    process that holds it. Taking it again from the same process is a no-op. Returns whether the lock file was
    created by this call (`unlock_output_dir` can then remove it, leaving a refused folder as it was)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag}={folder!r} cannot be made a folder ({err.strerror or err}).") from err
    path = _lock_path(folder)
    held = _HELD.get(path)
    if held is not None:
        if _still_ours(path, held):
            return False
        os.close(_HELD.pop(path))
    created = not os.path.lexists(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        warnings.warn("No fcntl on this system: two runs in one --output_dir are not prevented.", stacklevel=2)
        return False
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        raise ValueError(f"{flag}={folder!r}: cannot create its run lock {path} ({err.strerror or err}).") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "an unknown process"
        os.close(fd)
        raise ValueError(
            f"{flag}={folder!r} is in use by another run: process {holder} holds its lock ({path}). Two runs in "
            f"one folder would write their checkpoints over each other; wait for that run to end (a lock left by "
            f"a process that has ended does not count), or choose another {flag}."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD[path] = fd
    return created


def unlock_output_dir(folder: str, remove_file: bool = False) -> None:
    """Release the run lock of `folder` held by this process. The file stays unless `remove_file` (for a run
    refused before it wrote anything): removing it races with a contender that has just opened it, which
    matters only for runs allowed to proceed."""
    path = _lock_path(folder)
    held = _HELD.pop(path, None)
    if held is None:
        return
    if remove_file:
        try:
            os.unlink(path)
        except OSError:
            pass
    os.close(held)  # closing the descriptor releases the flock
