"""Image data for ``run_image_classification.py``: image folders and zips, scikit-learn's digits, and the
training-time augmentation with the dataset wrapper that applies the image processor.

Bad folders are a ``ValueError`` naming the flag and the path.
"""

from __future__ import annotations

import math
import os
import zipfile
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image
from transformers import TrainerCallback

from labo_hf.hf._compat import scratch_image_processor_class

__all__ = [
    "AugmentationEpochCallback",
    "ProcessedImageDataset",
    "RandomCropFlip",
    "check_image_folder",
    "collate_fn",
    "load_digits_dataset",
    "load_image_folders",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The digits are split once and for all with this seed (independent of --seed) so that every run, whatever
# its seed or regularizer, is evaluated on the same 360 images.
DIGITS_SPLIT_SEED = 0
DIGITS_VALIDATION_FRACTION = 0.2


def _image_label_pairs_from_folder(root: str, flag: str) -> list[tuple[str, bytes | None, str]]:
    """(path, bytes or None, class name) for every image of a folder or zip laid out as
    ``<class>/<image>`` or ``<split>/<class>/<image>`` (one split folder only)."""
    found: list[tuple[list[str], str, bytes | None]] = []  # (relative path parts, path, bytes)
    if zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as archive:
            for name in sorted(archive.namelist()):
                parts = name.split("/")
                # Skip folder entries, non-images and macOS resource forks.
                if name.endswith("/") or not name.lower().endswith(IMAGE_EXTENSIONS) or parts[0] == "__MACOSX":
                    continue
                found.append((parts, f"{root}::{name}", archive.read(name)))
    else:
        for directory, subdirectories, files in os.walk(root):
            subdirectories.sort()
            for file_name in sorted(files):
                if file_name.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(directory, file_name)
                    found.append((os.path.relpath(path, root).split(os.sep), path, None))
    depths = {len(parts) for parts, _, _ in found}
    tops = {parts[0] for parts, _, _ in found}
    # A label is the image's folder name; images at other depths, or several split folders, would mix
    # splits or take a split's name for a class, so such layouts are refused rather than guessed.
    if depths and not (depths == {2} or (depths == {3} and len(tops) == 1)):
        raise ValueError(
            f"{flag}={root!r}: expected images at <class>/<image> or <split>/<class>/<image> (one split); "
            f"found images at depths {sorted(depths)} under top-level entries {sorted(tops)[:5]}"
        )
    return [(path, data, parts[-2]) for parts, path, data in found]


def check_image_folder(path: str | None, flag: str) -> None:
    """``path`` (the value of ``flag``; None: not given) is an existing folder or a readable zip file."""
    if path is None:
        return
    if not os.path.exists(path):
        raise ValueError(f"{flag}={path!r}: no such folder or zip file")
    if not (os.path.isdir(path) or zipfile.is_zipfile(path)):
        hint = " (truncated or corrupt? its zip directory cannot be read)" if path.lower().endswith(".zip") else ""
        raise ValueError(f"{flag}={path!r} is neither a folder nor a zip file{hint}")


def load_image_folders(
    train_dir: str | None, validation_dir: str | None, test_dir: str | None
) -> DatasetDict:
    """Read image folders or zips (see --train_dir) into a DatasetDict with columns image and label.

    Read directly rather than with datasets' "imagefolder" builder, which does not infer labels from the
    folders inside a zip; the class names of all splits together, sorted, define the label ids.
    """
    splits = {"train": ("--train_dir", train_dir), "validation": ("--validation_dir", validation_dir)}
    splits["test"] = ("--test_dir", test_dir)
    pairs_by_split = {}
    for split, (flag, path) in splits.items():
        if path is None:
            continue
        check_image_folder(path, flag)
        pairs = _image_label_pairs_from_folder(path, flag)
        if not pairs:
            raise ValueError(
                f"{flag}={path!r} holds no images in class folders; expected <class>/<image> "
                f"(or <split>/<class>/<image> in a zip) with extensions {', '.join(IMAGE_EXTENSIONS)}"
            )
        pairs_by_split[split] = pairs
    class_names = sorted({label for pairs in pairs_by_split.values() for _, _, label in pairs})
    label_ids = {name: i for i, name in enumerate(class_names)}
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=class_names)})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "image": [{"path": path, "bytes": data} for path, data, _ in pairs],
                    "label": [label_ids[label] for _, _, label in pairs],
                },
                features=features,
            )
            for split, pairs in pairs_by_split.items()
        }
    )


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's digits (1,797 real 8x8 grayscale images, 10 classes) as train/validation splits.

    Stratified 80/20 split with the fixed seed DIGITS_SPLIT_SEED. The 17 gray levels (0..16) are scaled
    to 0..255 so that the usual 8-bit image processors apply unchanged.
    """
    # Imported here: only this default needs scikit-learn, and importing it costs about a second.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_index, validation_index = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_VALIDATION_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def build(index: np.ndarray) -> Dataset:
        index = np.sort(index)
        return Dataset.from_dict(
            {"image": [Image.fromarray(images[i]) for i in index], "label": labels[index].tolist()},
            features=features,
        )

    return DatasetDict({"train": build(train_index), "validation": build(validation_index)})


class RandomCropFlip:
    """Training-time augmentation on a processed ``(C, H, W)`` image: random crop after padding, and an
    optional horizontal flip.

    The randomness of example ``index`` in epoch ``epoch`` comes from a generator seeded by
    ``(seed, epoch, index)`` alone, not from a global random state: the same example gets the same
    augmentation whatever the process count, the data-loader prefetching and the resumption point,
    which makes a resumed run bit-identical to an uninterrupted one. ``epoch`` is advanced by
    ``AugmentationEpochCallback``.

    Padding uses ``fill`` per channel (the processed value of a black pixel), i.e. zero-padding of the
    raw image, the usual CIFAR recipe; padding with 0 after normalization would paint the border gray.
    """

    def __init__(self, padding: int, horizontal_flip: bool, fill: np.ndarray, seed: int) -> None:
        self.padding = padding
        self.horizontal_flip = horizontal_flip
        self.fill = np.asarray(fill, dtype=np.float32).reshape(-1, 1, 1)
        self.seed = seed
        # In shared memory so that data-loader worker processes, persistent ones included, see the epoch
        # the main process sets (a plain int would be copied into each worker once).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def __call__(self, pixel_values: np.ndarray, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        out = pixel_values
        if self.padding > 0:
            channels, height, width = pixel_values.shape
            pad = self.padding
            padded = np.empty((channels, height + 2 * pad, width + 2 * pad), dtype=pixel_values.dtype)
            padded[...] = self.fill
            padded[:, pad : pad + height, pad : pad + width] = pixel_values
            top, left = rng.integers(0, 2 * pad + 1, size=2)
            out = padded[:, top : top + height, left : left + width]
        if self.horizontal_flip and rng.random() < 0.5:
            out = out[:, :, ::-1]
        return np.ascontiguousarray(out)


class AugmentationEpochCallback(TrainerCallback):
    """Tells the augmentation which epoch starts (the Trainer does not pass it to the dataset)."""

    def __init__(self, augmentation: RandomCropFlip) -> None:
        self.augmentation = augmentation

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is epochs done so far as a float (whole at epoch boundaries, fractional when resuming
        # mid-epoch), so its floor is the index of the epoch that starts, fresh or resumed.
        self.augmentation.epoch = math.floor(state.epoch or 0.0)


class ProcessedImageDataset(torch.utils.data.Dataset):
    """Applies the image processor (and, for training, the augmentation) when an example is read.

    A plain torch Dataset rather than ``datasets.Dataset.set_transform``: the Trainer's
    ``remove_unused_columns`` would strip the raw image and label columns of a ``datasets.Dataset``
    before the transform sees them; with this wrapper the flag is harmless at either value (the examples
    only hold ``pixel_values`` and ``labels``). The index also seeds the augmentation.
    """

    def __init__(
        self,
        dataset: Dataset,
        image_column: str,
        label_column: str | None,
        image_processor: Any,
        augmentation: RandomCropFlip | None = None,
    ) -> None:
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.image_processor = image_processor
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[int(index)]
        image = example[self.image_column].convert("RGB")
        pixel_values = self.image_processor(images=image, return_tensors="np")["pixel_values"][0]
        if self.augmentation is not None:
            pixel_values = self.augmentation(pixel_values, int(index))
        item = {"pixel_values": torch.from_numpy(np.asarray(pixel_values, dtype=np.float32))}
        if self.label_column is not None:
            item["labels"] = int(example[self.label_column])
        return item


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([example["labels"] for example in examples], dtype=torch.long)
    return batch


def scratch_processor_class(model_type: str) -> Any:
    processor_class = scratch_image_processor_class(model_type)
    if processor_class is None:
        raise ValueError(f"No PIL image processor is known for --model_type {model_type}; pass --image_processor_name")
    return processor_class


def scratch_image_processor(config: Any) -> Any:
    """The model type's own image processor (PIL backend), resizing to the config's image size."""
    processor_class = scratch_processor_class(config.model_type)
    image_size = getattr(config, "image_size", None)
    if image_size is None:
        return processor_class()
    return processor_class(size={"height": image_size, "width": image_size})


def processed_size(image_processor: Any, config: Any) -> int:
    size = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None) or {}
    for key in ("height", "shortest_edge"):
        if isinstance(size, dict) and size.get(key):
            return int(size[key])
    return int(getattr(config, "image_size", 224))


class SaveFinalStepCallback(TrainerCallback):
    """Save the final step as a checkpoint under the script's default ``--save_strategy no``: rerunning the
    command then resumes from it, recognizes the finished run and trains nothing (`RunGuardMixin`), instead of
    training the whole run again and overwriting its model."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:  # noqa: D102
        if state.global_step >= state.max_steps:
            control.should_save = True
        return control
