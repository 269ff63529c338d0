"""Data problems found when the data set is prepared, not in the middle of an epoch.

- `check_images`: every image of a column is decoded once; an undecodable one (corrupt, empty, truncated) is
  an error naming the file, or, when asked, is left out and counted. The verdict is cached under the
  datasets cache, keyed by the data's identity, so that a rerun on the same data does not decode again.
- `drop_blank_text_pairs`: translation pairs with an empty or whitespace-only side are dropped with a
  warning; a data set left with no pair is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from typing import Any

__all__ = ["check_images", "drop_blank_text_pairs", "image_problem"]

_CHECK_VERSION = b"labo-image-check-1"
_BATCH = 1000


def image_problem(value: dict[str, Any]) -> str | None:
    """Why the undecoded image `value` (``{"path", "bytes"}``, as a datasets ``Image(decode=False)``
    column holds it) cannot be used, or None when it decodes completely."""
    from PIL import Image

    try:
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
        if source is None:
            return "no image data (neither bytes nor a path)"
        with Image.open(source) as image:
            image.load()  # decodes the pixels: a truncated file only fails here
    except Exception as err:  # noqa: BLE001 - PIL reports corrupt data through many exception types
        return f"{type(err).__name__}: {err}"
    return None


def _image_name(value: dict[str, Any], index: int) -> str:
    return value.get("path") or f"the image of row {index}"


def _cache_key(dataset: Any, column: str) -> str:
    """Identity of the column's images: datasets' fingerprint for data held in Arrow files on disk (a Hub
    data set), else the bytes themselves or, for images referenced by path, the path, size and mtime (so a
    repaired file is checked again)."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(_CHECK_VERSION + column.encode())
    if dataset.cache_files:
        hasher.update(dataset._fingerprint.encode())
        return hasher.hexdigest()
    for batch in dataset.iter(batch_size=_BATCH):
        for value in batch[column]:
            value = value or {}
            if value.get("bytes") is not None:
                hasher.update(b"b" + hashlib.blake2b(value["bytes"], digest_size=16).digest())
            else:
                path = value.get("path") or ""
                stat = os.stat(path) if path and os.path.exists(path) else None
                hasher.update(f"p{path}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}".encode())
    return hasher.hexdigest()


def _find_bad_images(dataset: Any, column: str) -> list[tuple[int, str, str]]:
    bad = []
    index = 0
    for batch in dataset.iter(batch_size=_BATCH):
        for value in batch[column]:
            value = value or {}
            problem = image_problem(value)
            if problem is not None:
                bad.append((index, _image_name(value, index), problem))
            index += 1
    return bad


def check_images(
    dataset: Any,
    column: str,
    *,
    where: str,
    skip_bad_images: bool = False,
    cache_dir: str | None = None,
    logger: logging.Logger | None = None,
) -> tuple[Any, int]:
    """Decode every image of `column` of the datasets ``Dataset`` `dataset` once.

    Returns the data set and how many images were left out. An undecodable image raises ``ValueError``
    naming the file and `where` (e.g. "--train_dir=..."), unless `skip_bad_images`, which leaves such images
    out and logs their number. Verdicts are cached in `cache_dir` (default: the datasets cache).
    """
    from datasets import Image
    from datasets import config as datasets_config

    undecoded = dataset.cast_column(column, Image(decode=False))
    cache_root = os.path.join(cache_dir or datasets_config.HF_DATASETS_CACHE, "labo_image_checks")
    cache_file = os.path.join(cache_root, _cache_key(undecoded, column) + ".json")
    bad: list[tuple[int, str, str]] | None = None
    if os.path.isfile(cache_file):
        try:
            with open(cache_file, encoding="utf-8") as f:
                bad = [tuple(entry) for entry in json.load(f)["bad"]]
        except (OSError, ValueError, KeyError, TypeError):
            bad = None  # an unreadable cache entry is recomputed, never trusted
    if bad is None:
        bad = _find_bad_images(undecoded, column)
        try:
            os.makedirs(cache_root, exist_ok=True)
            with open(cache_file + ".partial", "w", encoding="utf-8") as f:
                json.dump({"bad": bad}, f)
            os.replace(cache_file + ".partial", cache_file)
        except OSError:
            pass  # a read-only cache only costs the check again next time
    if not bad:
        return dataset, 0
    shown = "; ".join(f"{name} ({problem})" for _, name, problem in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if not skip_bad_images:
        raise ValueError(
            f"{where}: {len(bad)} of {len(dataset)} images cannot be decoded: {shown}. Repair or remove them, "
            "or pass --skip_bad_images to leave them out."
        )
    if len(bad) == len(dataset):
        raise ValueError(f"{where}: none of its {len(dataset)} images can be decoded: {shown}.")
    (logger or logging.getLogger(__name__)).warning(
        f"{where}: left out {len(bad)} of {len(dataset)} images that cannot be decoded (--skip_bad_images): {shown}"
    )
    bad_rows = {index for index, _, _ in bad}
    return dataset.select([i for i in range(len(dataset)) if i not in bad_rows]), len(bad)


def drop_blank_text_pairs(
    dataset: Any,
    source_key: str,
    target_key: str,
    *,
    where: str,
    drop: bool = True,
    logger: logging.Logger | None = None,
) -> tuple[Any, int]:
    """Drop the pairs of the ``translation`` column with an empty or whitespace-only side.

    Returns the data set and the number of blank pairs. Logs a warning when there are some; raises
    ``ValueError`` naming `where` when no pair has text on both sides. With ``drop=False`` blank pairs are
    counted and reported but kept (e.g. a test set whose predictions must stay line-aligned with its file).
    """

    def usable(batch: dict[str, list[Any]]) -> list[bool]:
        return [
            bool(pair) and bool((pair.get(source_key) or "").strip()) and bool((pair.get(target_key) or "").strip())
            for pair in batch["translation"]
        ]

    kept = dataset.filter(usable, batched=True, desc=f"Looking for blank pairs in {where}")
    blank = len(dataset) - len(kept)
    if len(kept) == 0:
        raise ValueError(
            f"{where}: none of its {len(dataset)} pairs has text on both sides ({source_key} and {target_key} "
            "are empty or whitespace only); check the files or the --source_lang/--target_lang columns."
        )
    if blank:
        action = "dropped" if drop else "kept (so that outputs stay aligned with the file's lines)"
        (logger or logging.getLogger(__name__)).warning(
            f"{where}: {blank} of {len(dataset)} pairs have an empty or whitespace-only {source_key} or "
            f"{target_key} side; {action}."
        )
    return (kept if drop else dataset), blank
