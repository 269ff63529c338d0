"""Data problems are errors (or counted drops) when the data set is prepared (`labo_hf.examples.data_checks`)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from labo_hf.examples import data_checks
from labo_hf.examples.data_checks import check_images, drop_blank_text_pairs


def _jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _folder_dataset(tmp_path, bad_kind: str | None) -> Dataset:
    """Four JPEG files referenced by path (as the image-folder loader builds them); one spoiled by `bad_kind`."""
    paths = []
    for i in range(4):
        path = tmp_path / f"img{i}.jpg"
        path.write_bytes(_jpeg_bytes(i))
        paths.append(str(path))
    bad = tmp_path / "img2.jpg"
    if bad_kind == "corrupt":
        bad.write_bytes(b"\xff\xd8 this is not a JPEG stream at all" * 10)
    elif bad_kind == "empty":
        bad.write_bytes(b"")
    elif bad_kind == "truncated":
        bad.write_bytes(_jpeg_bytes(2)[: len(_jpeg_bytes(2)) // 2])
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
    return Dataset.from_dict({"image": [{"path": p, "bytes": None} for p in paths], "label": [0, 1, 0, 1]},
                             features=features)


@pytest.mark.parametrize("bad_kind", ["corrupt", "empty", "truncated"])
def test_bad_image_is_an_error_naming_the_file_or_is_skipped_and_counted(bad_kind, tmp_path):
    dataset = _folder_dataset(tmp_path, bad_kind)
    with pytest.raises(ValueError, match=r"--train_dir=X: 1 of 4 images cannot be decoded: .*img2\.jpg.*"
                                         r"--skip_bad_images"):
        check_images(dataset, "image", where="--train_dir=X", cache_dir=str(tmp_path / "cache"))
    kept, skipped = check_images(dataset, "image", where="--train_dir=X", skip_bad_images=True,
                                 cache_dir=str(tmp_path / "cache"))
    assert skipped == 1 and len(kept) == 3
    assert [value["path"] for value in kept.cast_column("image", ImageFeature(decode=False))["image"]] == [
        str(tmp_path / f"img{i}.jpg") for i in (0, 1, 3)
    ]


def test_good_images_pass_and_the_verdict_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    dataset = _folder_dataset(tmp_path, None)
    cache = str(tmp_path / "cache")
    assert check_images(dataset, "image", where="w", cache_dir=cache) == (dataset, 0)
    decoded = []
    real = data_checks.image_problem
    monkeypatch.setattr(data_checks, "image_problem", lambda value: decoded.append(value) or real(value))
    check_images(dataset, "image", where="w", cache_dir=cache)
    assert decoded == []  # a rerun on the same data decodes nothing
    (tmp_path / "img1.jpg").write_bytes(b"")  # the file changed: checked again, and found bad
    with pytest.raises(ValueError, match="img1.jpg"):
        check_images(dataset, "image", where="w", cache_dir=cache)
    assert len(decoded) == 4


def test_in_memory_images_are_named_by_row(tmp_path):
    features = Features({"image": ImageFeature()})
    dataset = Dataset.from_dict({"image": [{"bytes": _jpeg_bytes(0), "path": None},
                                           {"bytes": b"\x00" * 10, "path": None}]}, features=features)
    with pytest.raises(ValueError, match="the image of row 1"):
        check_images(dataset, "image", where="--dataset_name d", cache_dir=str(tmp_path))


def _pairs(rows):
    return Dataset.from_dict({"translation": [{"de": de, "en": en} for de, en in rows]})


def test_blank_text_pairs_are_dropped_with_a_warning(caplog):
    dataset = _pairs([("eins", "one"), ("", "two"), ("drei", "   "), ("vier", "four")])
    with caplog.at_level("WARNING"):
        kept, blank = drop_blank_text_pairs(dataset, "de", "en", where="--train_prefix p")
    assert blank == 2 and kept["translation"] == [{"de": "eins", "en": "one"}, {"de": "vier", "en": "four"}]
    assert "--train_prefix p: 2 of 4 pairs have an empty or whitespace-only de or en side; dropped" in caplog.text
    same, blank = drop_blank_text_pairs(dataset, "de", "en", where="--test_prefix p", drop=False)
    assert blank == 2 and len(same) == 4


def test_only_blank_text_pairs_are_an_error():
    with pytest.raises(ValueError, match="--train_prefix p: none of its 3 pairs has text on both sides"):
        drop_blank_text_pairs(_pairs([("", ""), (" ", "\t"), ("", "x")]), "de", "en", where="--train_prefix p")
