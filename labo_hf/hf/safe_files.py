"""Writing labo-hf's own small files safely, and saying plainly when the disk is full.

`write_new_file` creates its file with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a symlink planted where labo-hf
writes (``labo_run.json.partial`` pointing outside the output folder) is never written through; a stale
file of that name, left by an interrupted write, is unlinked (the link itself, never its target) and
created anew. The final name is then reached with ``os.replace``, which replaces a symlink rather than
following it.

`raise_if_disk_full` turns a failed write into one clear ``OSError(ENOSPC)`` naming the path and "no space
left on device". A full disk surfaces in many forms: ``OSError(ENOSPC)`` from Python, but torch's
serializer reports ``basic_ios::clear: iostream error`` or ``PytorchStreamWriter failed writing file``; for
those the free space of the filesystem decides.
"""

from __future__ import annotations

import errno
import os
import shutil

__all__ = ["DiskFullError", "is_disk_full", "raise_if_disk_full", "write_new_file"]

# Below this much free space a failed write is taken for a full disk (torch's serializer loses the errno).
_NEARLY_FULL_BYTES = 64 << 20
_TORCH_WRITE_ERRORS = ("iostream error", "failed writing file", "unexpected pos", "file write failed")


class DiskFullError(OSError):
    """A write failed because the filesystem has no space left; the message names the path."""


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_disk_full(err: BaseException, path: str) -> bool:
    """Whether `err`, raised while writing under `path`, comes from a full filesystem."""
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    if any(marker in str(link) for link in _chain(err) for marker in _TORCH_WRITE_ERRORS):
        probe = path
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        try:
            return shutil.disk_usage(probe or ".").free < _NEARLY_FULL_BYTES
        except OSError:
            return False
    return False


def raise_if_disk_full(err: BaseException, path: str, what: str) -> None:
    """Raise `DiskFullError` naming `path` when `err` (raised while writing `what` there) is a full disk."""
    if isinstance(err, DiskFullError) or not is_disk_full(err, path):
        return
    raise DiskFullError(
        errno.ENOSPC,
        f"No space left on device while writing {what} ({path}). Nothing partial was kept; free some space "
        "and run the same command again: it continues as if this attempt had not happened",
    ) from err


def write_new_file(path: str, content: str | bytes, *, fsync: bool = False) -> None:
    """Create `path` (never through a symlink) holding `content`; on failure nothing is left at `path`."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        # Left by an interrupted write (or planted): remove the entry itself, never what a link points to.
        os.unlink(path)
        fd = os.open(path, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException as err:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise_if_disk_full(err, path, os.path.basename(path))
        raise
