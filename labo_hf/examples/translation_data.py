"""Local translation data for ``run_translation.py``: parallel text files, json lines and csv/tsv.

Each reader returns a `datasets.Dataset` with one transformers-style ``translation`` column
(``{"de": ..., "en": ...}`` per row); a bad file is a ``ValueError`` naming the flag and the file.
"""

from __future__ import annotations

import csv
import gzip
import os
import zlib
from typing import Any

from datasets import Dataset, Features, Value, load_dataset

__all__ = [
    "find_language_file",
    "load_local_file",
    "local_file_format",
    "read_lines",
    "read_parallel_text",
    "to_translation_format",
]

LOCAL_FILE_FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "tsv": "csv"}

def local_file_format(path: str) -> str | None:
    """The datasets builder ("json" or "csv") for a local data file, from its extension (.gz allowed)."""
    name = path[: -len(".gz")] if path.endswith(".gz") else path
    return LOCAL_FILE_FORMATS.get(name.rsplit(".", 1)[-1].lower()) if "." in name else None


def find_language_file(prefix: str, lang: str, flag: str) -> str:
    """PREFIX.LANG or PREFIX.LANG.gz; exactly one of them must exist."""
    candidates = [f"{prefix}.{lang}", f"{prefix}.{lang}.gz"]
    existing = [path for path in candidates if os.path.isfile(path)]
    if not existing:
        raise ValueError(f"{flag}={prefix!r}: found neither {candidates[0]} nor {candidates[1]}.")
    if len(existing) == 2:
        # Both could differ (a stale uncompressed copy); refusing is safer than picking one silently.
        raise ValueError(f"{flag}={prefix!r}: both {candidates[0]} and {candidates[1]} exist; keep only one.")
    return existing[0]


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 text file (gzip when it ends in .gz), split on '\\n' only.

    str.splitlines() would also split on characters such as U+2028 that can occur inside a sentence and
    would silently shift the alignment of parallel files.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        # A truncated download or copy: name the file instead of a traceback from inside gzip.
        raise ValueError(f"{path}: corrupt or truncated gzip file ({err}).") from err
    try:
        # utf-8-sig: a byte order mark that editors put at the start of a file is not text of the first line
        # (it would reach the tokenizer's vocabulary as a token of its own).
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}).") from err
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_parallel_text(prefix: str, source_key: str, target_key: str, flag: str) -> Dataset:
    """Parallel text files PREFIX.SRC / PREFIX.TGT as a data set with a transformers-style 'translation' column."""
    source_path = find_language_file(prefix, source_key, flag)
    target_path = find_language_file(prefix, target_key, flag)
    sources, targets = read_lines(source_path), read_lines(target_path)
    if len(sources) != len(targets):
        raise ValueError(
            f"{flag}={prefix!r}: misaligned parallel files: {source_path} has {len(sources)} lines but "
            f"{target_path} has {len(targets)} lines."
        )
    if not sources:
        raise ValueError(f"{flag}={prefix!r}: {source_path} and {target_path} are empty.")
    return Dataset.from_dict(
        {"translation": [{source_key: s, target_key: t} for s, t in zip(sources, targets, strict=True)]}
    )


def check_gzip_complete(path: str, flag: str) -> None:
    """Read a .gz file through once (streaming), so that a truncated or corrupt one is an error naming it
    rather than a failure deep inside the datasets builder."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{flag}={path!r}: corrupt or truncated gzip file ({err}).") from err


def load_local_file(path: str, flag: str, cache_dir: str | None) -> Dataset:
    """A json lines or csv/tsv file as a data set (csv/tsv columns kept as text, never parsed as numbers)."""
    builder = local_file_format(path)
    if path.endswith(".gz"):
        check_gzip_complete(path, flag)
    if builder == "json":
        return load_dataset("json", data_files={"data": path}, split="data", cache_dir=cache_dir)
    is_tsv = path.removesuffix(".gz").lower().endswith(".tsv")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter="\t" if is_tsv else ","), None)
    if not header:
        raise ValueError(f"{flag}={path!r}: empty file, expected a header row naming the language columns.")
    return load_dataset(
        "csv",
        data_files={"data": path},
        split="data",
        cache_dir=cache_dir,
        delimiter="\t" if is_tsv else ",",
        # In tsv files quotes are ordinary characters of the text; csv files use standard quoting.
        quoting=csv.QUOTE_NONE if is_tsv else csv.QUOTE_MINIMAL,
        keep_default_na=False,  # a sentence such as "NA" or "null" stays text
        features=Features({column: Value("string") for column in header}),
    )


def to_translation_format(dataset: Dataset, source_key: str, target_key: str, origin: str) -> Dataset:
    """Check that both languages are present and return a data set with one 'translation' column.

    Accepts the transformers format ({'translation': {lang: text}}) and one column per language (csv/tsv).
    ``origin`` names the file or data set in error messages.
    """
    if "translation" in dataset.column_names:
        feature = dataset.features["translation"]
        if hasattr(feature, "languages"):  # datasets.Translation
            languages = list(feature.languages)
        elif isinstance(feature, dict):
            languages = list(feature)
        else:
            raise ValueError(f"{origin}: the 'translation' column must map languages to text, got {feature}.")
        for flag, key in (("--source_lang", source_key), ("--target_lang", target_key)):
            if key not in languages:
                raise ValueError(f"{flag} {key!r} is not in {origin}: its translations have languages {languages}.")
        if dataset.column_names == ["translation"]:
            return dataset
        return dataset.select_columns(["translation"])
    for flag, key in (("--source_lang", source_key), ("--target_lang", target_key)):
        if key not in dataset.column_names:
            raise ValueError(
                f"{flag} {key!r} is not in {origin}: expected a 'translation' column or one column per "
                f"language, found columns {dataset.column_names}."
            )

    def pack(batch: dict[str, list[Any]]) -> dict[str, list[dict[str, str]]]:
        return {
            "translation": [
                {source_key: s, target_key: t} for s, t in zip(batch[source_key], batch[target_key], strict=True)
            ]
        }

    return dataset.map(pack, batched=True, remove_columns=dataset.column_names, desc=f"Reading {origin}")

