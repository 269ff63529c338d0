#!/usr/bin/env python
# Copyright 2026 The labo-hf authors. Licensed under the Apache License, Version 2.0.
# Structure follows transformers' examples/pytorch/image-classification/run_image_classification.py.
"""Train (or fine-tune) an image classifier with LABO label regularization ("optimal label smoothing").

The loss is selected with ``--label_regularizer``:

- ``labo`` (default): the smoothing mass ``--label_regularizer_alpha`` (default 0.1) is spread over the
  non-target classes by a softmax of the model's own logits at temperature ``--labo_temperature``
  (default 2.0);
- ``label_smoothing``: conventional uniform label smoothing with the same alpha;
- ``cross_entropy``: no regularization.

Evaluation reports accuracy (plus top-5 accuracy when there are more than 10 classes), the negative
log-likelihood ``eval_nll`` and the expected calibration error ``eval_ece`` (15 bins), since label
regularizers change calibration as much as accuracy.

Quick start (offline, CPU, under a minute on two cores): with no data argument the script trains a small ViT from
scratch on scikit-learn's digits (1,797 real 8x8 images, stratified 80/20 split), then evaluates it and
writes ``eval_accuracy`` to ``OUTPUT_DIR/all_results.json``::

    python run_image_classification.py --output_dir outputs/digits-labo

Compare regularizers on the same data (any other flag keeps its value)::

    python run_image_classification.py --output_dir outputs/digits-ls --label_regularizer label_smoothing
    python run_image_classification.py --output_dir outputs/digits-ce --label_regularizer cross_entropy
    python run_image_classification.py --output_dir outputs/digits-t1 --labo_temperature 1.0

Image folders (``<class>/<image>``) or zip files of them (``<split>/<class>/<image>`` or
``<class>/<image>`` inside the zip), e.g. CIFAR-10, from scratch with a ViT sized for 32x32 images::

    python run_image_classification.py --output_dir outputs/cifar10-labo \\
        --train_dir /path/to/cifar10/train.zip --validation_dir /path/to/cifar10/test.zip \\
        --model_type vit \\
        --config_overrides image_size=32,patch_size=4,hidden_size=192,num_hidden_layers=6,num_attention_heads=3,intermediate_size=768 \\
        --num_train_epochs 50 --per_device_train_batch_size 128 --learning_rate 1e-3

Fine-tune a pretrained checkpoint (Hub id or local folder) on a Hub dataset::

    python run_image_classification.py --output_dir outputs/beans-labo \\
        --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name beans \\
        --learning_rate 2e-5 --num_train_epochs 5 --per_device_train_batch_size 32 \\
        --eval_strategy epoch --save_strategy epoch --push_to_hub

Checkpoints and resuming: pass a ``--save_strategy`` (the from-scratch default is ``no``); running the
same command again with the same ``--output_dir`` resumes from its last ``checkpoint-*`` folder, and
``--resume_from_checkpoint`` names one explicitly::

    python run_image_classification.py --output_dir outputs/digits-labo --save_strategy epoch
    python run_image_classification.py --output_dir outputs/digits-labo2 \\
        --resume_from_checkpoint outputs/digits-labo/checkpoint-230

Several processes (the command is otherwise unchanged)::

    torchrun --nproc_per_node 2 run_image_classification.py --output_dir outputs/digits-ddp
    accelerate launch --num_processes 2 run_image_classification.py --output_dir outputs/digits-ddp

(on a machine without GPUs, add ``--use_cpu`` to the torchrun command).

All arguments can also come from one JSON or YAML file: ``python run_image_classification.py args.yaml``.

Defaults chosen by this script (each applies only when the user did not set the flag; the ones applied
are logged at startup):

- No ``--do_train``/``--do_eval``/``--do_predict`` at all: ``--do_train --do_eval``.
- No ``--model_name_or_path``, ``--model_type`` or ``--config_name``: a small ViT from scratch
  (0.14M parameters), ``--model_type vit`` with
  ``image_size=16,patch_size=4,hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=128``;
  ``--config_overrides`` still applies on top (e.g. ``image_size=32`` for CIFAR-sized images).
- Training from scratch (no ``--model_name_or_path``):
  ``--learning_rate 1e-3 --warmup_steps 0.1 --lr_scheduler_type cosine --weight_decay 0.05
  --num_train_epochs 30 --per_device_train_batch_size 64 --per_device_eval_batch_size 256
  --logging_steps 10 --save_strategy no`` (warmup 0.1 = 10% of the steps; no intermediate checkpoints,
  unless ``--save_steps`` is given, which keeps transformers' ``--save_strategy steps``).
  transformers' own defaults (lr 5e-5, 3 epochs, a checkpoint every 500 steps) suit fine-tuning.
- The small ViT default on CPU runs with one intra-op thread unless ``OMP_NUM_THREADS`` is set (its
  matrices are too small to gain from more, and oversubscribed cores make extra threads costly).
- The digits default has no test split: ``--do_predict`` predicts on its held-out 20%.
- ``--horizontal_flip`` unset: off for the digits default (mirrored digits are other symbols), on for any
  other data.
- ``--random_crop_padding`` unset: ``image_size // 8`` pixels (4 for 32x32 inputs, as in the usual
  CIFAR recipe); 0 turns random cropping off.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainerCallback,
    set_seed,
)
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

from labo_hf import LABOTrainer, LABOTrainingArguments
from labo_hf.metrics import classification_metrics
from labo_hf.script_utils import (
    check_hub_reachable_or_local,
    check_launch_matches_world_size,
    configure_logging,
    hub_load_errors,
    labo_model_card_kwargs,
    resolve_checkpoint,
    shutdown_distributed,
)

logger = logging.getLogger(__name__)

MODEL_TYPES = tuple(config.model_type for config in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING.keys())

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# The model used when no model argument is given: a ViT small enough to train from scratch on two CPU
# cores in about a minute. 16x16 inputs (the 8x8 digits upsampled) cut into 4x4 patches give 16 tokens.
SMALL_VIT_CONFIG: dict[str, Any] = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}

# Training defaults when the model starts from random weights (no --model_name_or_path). Keys are
# TrainingArguments fields; values are the command-line strings the user would have typed.
SCRATCH_TRAINING_DEFAULTS: dict[str, str] = {
    "learning_rate": "1e-3",
    "warmup_steps": "0.1",  # a float in [0, 1) is a fraction of the total steps in transformers 5
    "lr_scheduler_type": "cosine",
    "weight_decay": "0.05",
    "num_train_epochs": "30",
    "per_device_train_batch_size": "64",
    "per_device_eval_batch_size": "256",
    "logging_steps": "10",
    "save_strategy": "no",
}

# The digits default is split once and for all with this seed (independent of --seed) so that every run,
# whatever its seed or regularizer, is evaluated on the same 360 images.
DIGITS_SPLIT_SEED = 0
DIGITS_VALIDATION_FRACTION = 0.2
# Held out of the training data for evaluation when no validation data is given (--train_val_split).
DEFAULT_TRAIN_VAL_SPLIT = 0.15


@dataclass
class ModelArguments:
    """Which model, config and image processor to train, and from where."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": (
                "Pretrained checkpoint to fine-tune: a Hub id or a local folder. Leave unset to train from "
                "scratch (see --model_type)."
            )
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": (
                "Model type to train from scratch, e.g. 'vit' (transformers' default config for that type, "
                "adjusted by --config_overrides). With no model argument at all, a small ViT "
                f"({SMALL_VIT_CONFIG}) is used."
            ),
            "choices": list(MODEL_TYPES),
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config (Hub id or local folder) if not the same as --model_name_or_path."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": (
                "Comma-separated config changes for a model trained from scratch, e.g. "
                "'image_size=32,patch_size=4,hidden_size=128'."
            )
        },
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": (
                "Image processor (Hub id or local folder) if not the one of --model_name_or_path. From scratch, "
                "the model type's own processor resized to the config's image_size is used."
            )
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store models and datasets downloaded from the Hub."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model version to use: a branch name, tag name or commit id."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for private models or datasets (default: the one of `hf auth login`)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models defined by code on the Hub. Only for repositories you trust."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Load a checkpoint whose classification head has another number of classes (head re-initialized)."
        },
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how to augment it."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset on the Hub (or a local dataset folder) for load_dataset()."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_dir: str | None = field(
        default=None,
        metadata={
            "help": "Training images: a folder <class>/<image>, or a .zip of <class>/<image> or <split>/<class>/<image>."
        },
    )
    validation_dir: str | None = field(
        default=None,
        metadata={"help": "Validation images, same layouts as --train_dir (needs --train_dir)."},
    )
    test_dir: str | None = field(
        default=None,
        metadata={"help": "Test images for --do_predict, same layouts as --train_dir."},
    )
    image_column_name: str | None = field(
        default=None,
        metadata={"help": "Image column of --dataset_name (default: the first column of type Image)."},
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Label column of --dataset_name (default: 'label' or 'labels', else the first ClassLabel)."},
    )
    train_val_split: float | None = field(
        default=None,
        metadata={
            "help": (
                "Fraction of the training data held out (stratified, seeded by --seed) for evaluation when no "
                "validation data is given. Default (unset): 0.15."
            )
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many (randomly chosen) training examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many (randomly chosen) validation examples."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many (randomly chosen) test examples."}
    )
    horizontal_flip: bool | None = field(
        default=None,
        metadata={
            "help": "Random horizontal flips at training time. Default (unset): off for the digits default, on otherwise."
        },
    )
    random_crop_padding: int | None = field(
        default=None,
        metadata={
            "help": (
                "Random crop after zero-padding by this many pixels (at model input size) at training time. "
                "Default (unset): image_size // 8; 0 disables it."
            )
        },
    )

    def __post_init__(self) -> None:
        if self.train_val_split is not None and not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must lie in (0, 1); got {self.train_val_split}")
        for flag in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be >= 1; got {value}")
        if self.random_crop_padding is not None and self.random_crop_padding < 0:
            raise ValueError(f"--random_crop_padding must be >= 0; got {self.random_crop_padding}")


# ---------------------------------------------------------------------------------------------------------
# Argument parsing with documented script defaults
# ---------------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and keeps the description's line breaks (its commands stay copy-pastable)."""


def _explicit_cli_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names of the arguments present on the command line (whatever their value).

    Parses ``argv`` a second time with every default replaced by ``argparse.SUPPRESS``, so that only the
    arguments the user typed reach the namespace; this tells "left at the default" from "set to a value
    equal to the default", which comparing values cannot.
    """
    saved = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved.items():
            action.default = default
    return set(vars(namespace))


def _script_defaults(explicit: set[str], values: dict[str, Any]) -> dict[str, str]:
    """The script's defaults (see the module docstring) for the arguments the user did not set."""
    defaults: dict[str, str] = {}
    if not explicit & {"do_train", "do_eval", "do_predict"}:
        defaults.update({"do_train": "true", "do_eval": "true"})
    if values.get("model_name_or_path") is None:
        defaults.update(SCRATCH_TRAINING_DEFAULTS)
        if "save_steps" in explicit:
            # --save_steps alone asks for checkpoints at transformers' default save_strategy ("steps").
            defaults.pop("save_strategy")
    return {key: value for key, value in defaults.items() if key not in explicit}


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, LABOTrainingArguments, dict[str, str]]:
    """Parse the command line (or a single .json/.yaml file of arguments) into the three dataclasses.

    Returns the dataclasses and the script defaults that were applied (flag -> value).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, LABOTrainingArguments),
        # --help starts with this module's docstring (usage commands, script defaults), verbatim.
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            raise ValueError(f"Arguments file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            # YAML is a superset of JSON, so one loader reads both.
            file_arguments = yaml.safe_load(f) or {}
        if not isinstance(file_arguments, dict):
            raise ValueError(f"Arguments file {path!r} must hold a mapping of argument names to values")
        defaults = _script_defaults(set(file_arguments), file_arguments)
        # parse_dict type-checks nothing, so give the defaults the same types the CLI would produce.
        typed_defaults = {key: _typed_default(parser, key, value) for key, value in defaults.items()}
        model_args, data_args, training_args = parser.parse_dict({**typed_defaults, **file_arguments})
        return model_args, data_args, training_args, defaults

    # First parse: validates the command line (and answers --help, with the real defaults) and tells
    # whether a pretrained model is used.
    model_args, _, _ = parser.parse_args_into_dataclasses(args=argv)
    explicit = _explicit_cli_dests(parser, argv)
    defaults = _script_defaults(explicit, {"model_name_or_path": model_args.model_name_or_path})
    default_flags = [token for key, value in defaults.items() for token in (f"--{key}", value)]
    # The defaults come first so that nothing the user typed can be overridden by them (and they only
    # cover flags the user did not type anyway).
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=default_flags + argv)
    return model_args, data_args, training_args, defaults


def _typed_default(parser: argparse.ArgumentParser, dest: str, value: str) -> Any:
    for action in parser._actions:
        if action.dest == dest and action.type is not None:
            return action.type(value)
    return value


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


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
        if not os.path.exists(path):
            raise ValueError(f"{flag}={path!r}: no such folder or zip file")
        if not (os.path.isdir(path) or zipfile.is_zipfile(path)):
            raise ValueError(f"{flag}={path!r} is neither a folder nor a zip file")
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


def _find_columns(dataset: Dataset, data_args: DataTrainingArguments) -> tuple[str, str | None]:
    """The image and label columns (explicit names win; else detected by feature type and name)."""
    features = dataset.features
    image_column = data_args.image_column_name
    if image_column is None:
        image_column = next((name for name, f in features.items() if isinstance(f, ImageFeature)), None)
        if image_column is None:
            raise ValueError(f"No column of type Image in {list(features)}; pass --image_column_name")
    elif image_column not in features:
        raise ValueError(f"--image_column_name={image_column!r} is not a column of the dataset ({list(features)})")
    label_column = data_args.label_column_name
    if label_column is None:
        label_column = next((name for name in ("label", "labels") if name in features), None)
        if label_column is None:
            label_column = next((name for name, f in features.items() if isinstance(f, ClassLabel)), None)
    elif label_column not in features:
        raise ValueError(f"--label_column_name={label_column!r} is not a column of the dataset ({list(features)})")
    return image_column, label_column


def _encode_labels(raw: DatasetDict, label_column: str) -> DatasetDict:
    """Turn plain int or string labels into a ClassLabel shared by all splits (sorted values).

    ``DatasetDict.class_encode_column`` would encode each split on its own, so a class missing from one
    split would shift the ids of the others.
    """
    labelled = {name: split for name, split in raw.items() if label_column in split.features}
    values = sorted({value for split in labelled.values() for value in split[label_column]})
    ids = {value: i for i, value in enumerate(values)}
    encoded = dict(raw)  # splits without labels (e.g. an unlabelled test split) pass through
    for name, split in labelled.items():
        features = split.features.copy()
        features[label_column] = ClassLabel(names=[str(value) for value in values])
        encoded[name] = split.map(
            lambda labels: {label_column: [ids[value] for value in labels]},
            batched=True, input_columns=[label_column], features=features,
        )
    return DatasetDict(encoded)


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


def build_compute_metrics():
    def compute_metrics(eval_prediction) -> dict[str, float]:
        # eval_nll comes from LABOTrainer (summed loss statistics), so it is not repeated here.
        metrics = classification_metrics(eval_prediction.predictions, eval_prediction.label_ids)
        metrics.pop("nll")
        return metrics

    return compute_metrics


def _scratch_image_processor(model_type: str, config: Any) -> Any:
    """The model type's own image processor (PIL backend), resizing to the config's image size."""
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    name = names.get("pil") if isinstance(names, dict) else None
    if name is None:
        raise ValueError(
            f"No PIL image processor is known for --model_type {model_type}; pass --image_processor_name"
        )
    processor_class = getattr(transformers, name)
    image_size = getattr(config, "image_size", None)
    if image_size is None:
        return processor_class()
    return processor_class(size={"height": image_size, "width": image_size})


def _processed_size(image_processor: Any, config: Any) -> int:
    size = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None) or {}
    for key in ("height", "shortest_edge"):
        if isinstance(size, dict) and size.get(key):
            return int(size[key])
    return int(getattr(config, "image_size", 224))


def main(argv: list[str] | None = None) -> dict[str, float]:
    # ---- 1. Arguments ----
    model_args, data_args, training_args, applied_defaults = parse_arguments(argv)

    # ---- 2. Logging ----
    configure_logging(logger, training_args)
    if applied_defaults:
        logger.info(f"Script defaults applied (flags you did not set): {applied_defaults}")

    # ---- 3. Validate the combination of arguments (before anything slow) ----
    uses_small_vit = model_args.model_name_or_path is None and model_args.model_type is None and (
        model_args.config_name is None
    )
    uses_digits = all(
        path is None
        for path in (data_args.dataset_name, data_args.train_dir, data_args.validation_dir, data_args.test_dir)
    )
    if data_args.dataset_name is not None and (data_args.train_dir or data_args.validation_dir or data_args.test_dir):
        raise ValueError("--dataset_name cannot be combined with --train_dir/--validation_dir/--test_dir")
    if data_args.validation_dir is not None and data_args.train_dir is None and training_args.do_train:
        raise ValueError(
            f"--validation_dir={data_args.validation_dir!r} was given without --train_dir, but training is "
            "on: pass --train_dir too, or --do_eval alone (with --model_name_or_path) to only evaluate."
        )
    if data_args.test_dir is not None and not training_args.do_predict:
        raise ValueError(f"--test_dir={data_args.test_dir!r} is only used by --do_predict; add --do_predict")
    if model_args.config_overrides is not None and (model_args.model_name_or_path or model_args.config_name):
        raise ValueError(
            "--config_overrides only applies to a model trained from scratch; it cannot be combined with "
            "--model_name_or_path or --config_name"
        )
    if data_args.dataset_config_name is not None and data_args.dataset_name is None:
        raise ValueError("--dataset_config_name needs --dataset_name")
    if model_args.ignore_mismatched_sizes and model_args.model_name_or_path is None:
        raise ValueError("--ignore_mismatched_sizes only applies when loading --model_name_or_path")
    if model_args.model_type is not None and model_args.model_name_or_path is not None:
        raise ValueError("--model_type (train from scratch) cannot be combined with --model_name_or_path")
    check_launch_matches_world_size(training_args)
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise ValueError("Nothing to do: pass at least one of --do_train, --do_eval, --do_predict")
    local_model_hint = (
        "Pass a local checkpoint folder with --model_name_or_path, or train from scratch with --model_type vit "
        "(e.g. --config_overrides image_size=32,patch_size=4,hidden_size=128)."
    )
    for flag, name in (
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--config_name", model_args.config_name),
        ("--image_processor_name", model_args.image_processor_name),
    ):
        if name is not None:
            check_hub_reachable_or_local(name, flag, local_model_hint, cache_dir=model_args.cache_dir)
    local_data_hint = "Pass local images with --train_dir/--validation_dir (folders or zips) instead."
    if data_args.dataset_name is not None:
        check_hub_reachable_or_local(
            data_args.dataset_name, "--dataset_name", local_data_hint, repo_type="dataset",
            cache_dir=model_args.cache_dir,
        )

    if uses_small_vit and training_args.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The built-in small ViT multiplies 16x64 matrices: more intra-op threads gain nothing there, and
        # on oversubscribed cores (a shared machine) their synchronization made steps 10x slower in our
        # measurements. An explicit OMP_NUM_THREADS is left to torch.
        torch.set_num_threads(1)
        logger.info("Small ViT on CPU: using 1 intra-op thread (set OMP_NUM_THREADS to choose another number)")

    # ---- 4. Checkpoint detection (resume) ----
    checkpoint = resolve_checkpoint(training_args, logger)

    # Seed before the model is created, so that its random initialization is reproducible.
    set_seed(training_args.seed)

    # ---- 5. Data ----
    if data_args.dataset_name is not None:
        with training_args.main_process_first(desc="loading the dataset"), hub_load_errors(
            data_args.dataset_name, "--dataset_name", local_data_hint
        ):
            raw = load_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                cache_dir=model_args.cache_dir,
                token=model_args.token,
            )
        dataset_label = data_args.dataset_name
    elif uses_digits:
        raw = load_digits_dataset()
        dataset_label = "sklearn-digits"
    else:
        raw = load_image_folders(data_args.train_dir, data_args.validation_dir, data_args.test_dir)
        dataset_label = os.path.basename(
            os.path.normpath(data_args.train_dir or data_args.validation_dir or data_args.test_dir)
        )
    raw = DatasetDict(raw)
    for alias in ("val", "valid"):
        if "validation" not in raw and alias in raw:
            raw["validation"] = raw.pop(alias)
    first_split = next(iter(raw.values()))
    image_column, label_column = _find_columns(first_split, data_args)
    if label_column is None:
        raise ValueError(
            f"No label column found in {list(first_split.features)}; pass --label_column_name"
        )
    if not isinstance(first_split.features[label_column], ClassLabel):
        raw = _encode_labels(raw, label_column)
    class_names = raw[next(iter(raw))].features[label_column].names
    num_labels = len(class_names)
    if num_labels < 2:
        raise ValueError(f"Image classification needs at least 2 classes; found {class_names}")

    if training_args.do_eval and "validation" not in raw and "train" in raw:
        # Hold out part of the training data for evaluation (only when evaluating: a train-only run keeps
        # all of it).
        test_size = data_args.train_val_split if data_args.train_val_split is not None else DEFAULT_TRAIN_VAL_SPLIT
        split = raw["train"].train_test_split(
            test_size=test_size, seed=training_args.seed, stratify_by_column=label_column
        )
        raw["train"], raw["validation"] = split["train"], split["test"]
    elif data_args.train_val_split is not None:
        raise ValueError(
            f"--train_val_split={data_args.train_val_split} is unused: it only applies with --do_eval and "
            "training data without a validation split"
        )
    if uses_digits and training_args.do_predict:
        # The digits default has no third split; predict on the held-out 20% (documented in --help).
        raw["test"] = raw["validation"]
    for flag_on, split, flag in (
        (training_args.do_train, "train", "--do_train"),
        (training_args.do_eval, "validation", "--do_eval"),
        (training_args.do_predict, "test", "--do_predict"),
    ):
        if flag_on and split not in raw:
            raise ValueError(f"{flag} needs a {split} split; available: {list(raw)}")
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_predict_samples),
    ):
        if split in raw and limit is not None and limit < len(raw[split]):
            raw[split] = raw[split].shuffle(seed=training_args.seed).select(range(limit))

    # ---- 6. Model, config and image processor ----
    label2id = {name: i for i, name in enumerate(class_names)}
    id2label = dict(enumerate(class_names))
    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.model_name_or_path is not None or model_args.config_name is not None:
        config_source = model_args.config_name or model_args.model_name_or_path
        with hub_load_errors(config_source, "--config_name" if model_args.config_name else "--model_name_or_path",
                             local_model_hint):
            config = AutoConfig.from_pretrained(config_source, **hub_kwargs)
        if training_args.do_train:
            # A new label set for fine-tuning (the head is re-initialized when its size changes, with
            # --ignore_mismatched_sizes).
            config.num_labels = num_labels
            config.label2id = label2id
            config.id2label = id2label
            config.finetuning_task = "image-classification"
        else:
            # Evaluating or predicting only: the checkpoint's head must already predict these classes,
            # in this order; relabelling it would silently score the wrong classes.
            checkpoint_classes = [config.id2label[i] for i in range(config.num_labels)]
            if checkpoint_classes != class_names:
                raise ValueError(
                    f"The classes of the data {class_names} differ from those the checkpoint predicts "
                    f"({checkpoint_classes}); evaluate with the data the model was trained on, or add --do_train"
                )
        model_type = config.model_type
    else:
        model_type = model_args.model_type or "vit"
        config = CONFIG_MAPPING[model_type]()
        if uses_small_vit:
            config.update(SMALL_VIT_CONFIG)
        if model_args.config_overrides is not None:
            logger.info(f"Overriding config: {model_args.config_overrides}")
            config.update_from_string(model_args.config_overrides)
        config.num_labels = num_labels
        config.label2id = label2id
        config.id2label = id2label
        logger.info(f"Training a new {model_type} model from scratch: {config}")

    if model_args.model_name_or_path is not None:
        with hub_load_errors(model_args.model_name_or_path, "--model_name_or_path", local_model_hint):
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path, config=config,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub_kwargs,
            )
    else:
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info(f"Model: {type(model).__name__}, {num_parameters / 1e6:.2f}M parameters, {num_labels} classes")

    processor_source = model_args.image_processor_name or model_args.model_name_or_path
    if processor_source is not None:
        with hub_load_errors(processor_source, "--image_processor_name" if model_args.image_processor_name
                             else "--model_name_or_path", local_model_hint):
            image_processor = AutoImageProcessor.from_pretrained(processor_source, **hub_kwargs)
    else:
        image_processor = _scratch_image_processor(model_type, config)

    # ---- 7. Preprocessing and augmentation ----
    input_size = _processed_size(image_processor, config)
    padding = data_args.random_crop_padding if data_args.random_crop_padding is not None else input_size // 8
    horizontal_flip = data_args.horizontal_flip if data_args.horizontal_flip is not None else not uses_digits
    black = image_processor(images=Image.new("RGB", (input_size, input_size)), return_tensors="np")
    augmentation = RandomCropFlip(
        padding=padding,
        horizontal_flip=horizontal_flip,
        fill=black["pixel_values"][0][:, 0, 0],
        # data_seed, when set, is transformers' seed for data order; use it for the augmentation too.
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
    )
    logger.info(f"Training augmentation: random crop with padding {padding}, horizontal flip {horizontal_flip}")

    def wrap(split: str, augment: bool) -> ProcessedImageDataset | None:
        if split not in raw:
            return None
        return ProcessedImageDataset(
            raw[split], image_column, label_column if label_column in raw[split].features else None,
            image_processor, augmentation if augment and (padding > 0 or horizontal_flip) else None,
        )

    train_dataset = wrap("train", augment=True) if training_args.do_train else None
    eval_dataset = wrap("validation", augment=False) if training_args.do_eval else None
    predict_dataset = wrap("test", augment=False) if training_args.do_predict else None

    # ---- 8. Trainer ----
    trainer = LABOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        data_collator=collate_fn,
        compute_metrics=build_compute_metrics(),
        callbacks=[AugmentationEpochCallback(augmentation)],
    )

    all_metrics: dict[str, float] = {}
    # ---- 9. Training ----
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # also saves the image processor (processing_class) next to the weights
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        all_metrics.update(metrics)

    # ---- 10. Evaluation ----
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        all_metrics.update(metrics)

    # ---- 11. Prediction ----
    if training_args.do_predict:
        prediction = trainer.predict(predict_dataset, metric_key_prefix="predict")
        metrics = dict(prediction.metrics or {})
        metrics["predict_samples"] = len(predict_dataset)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        all_metrics.update(metrics)
        if trainer.is_world_process_zero():
            predicted = np.asarray(prediction.predictions).argmax(axis=-1)
            path = os.path.join(training_args.output_dir, "predict_results.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write("index\tprediction\n")
                for index, label_id in enumerate(predicted):
                    f.write(f"{index}\t{class_names[label_id]}\n")
            logger.info(f"Predictions written to {path}")

    # ---- 12. Model card and Hub ----
    card_kwargs = labo_model_card_kwargs(
        training_args,
        tasks="image-classification",
        dataset=dataset_label,
        finetuned_from=model_args.model_name_or_path,
    )
    card_kwargs["tags"] = ["image-classification", "vision", *card_kwargs["tags"]]
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)

    if "eval_accuracy" in all_metrics and trainer.is_world_process_zero():
        print(f"eval_accuracy = {all_metrics['eval_accuracy']:.4f}")
    return all_metrics


if __name__ == "__main__":
    main()
    shutdown_distributed()
