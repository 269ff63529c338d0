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

Checkpoints and resuming: pass a ``--save_strategy`` (the from-scratch default is ``no``, which still saves the
final step as a checkpoint); running the same command again with the same ``--output_dir`` resumes from its last
``checkpoint-*`` folder (a finished run: nothing is trained again), and ``--resume_from_checkpoint`` names one
explicitly::

    python run_image_classification.py --output_dir outputs/digits-labo --save_strategy epoch
    python run_image_classification.py --output_dir outputs/digits-labo2 \\
        --resume_from_checkpoint outputs/digits-labo/checkpoint-230

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
  --logging_steps 10 --save_strategy no --ddp_find_unused_parameters false`` (warmup 0.1 = 10% of the steps;
  every parameter of a model built here gets a gradient, so DDP need not search for unused ones; no intermediate
  checkpoints,
  unless ``--save_steps`` is given, which keeps transformers' ``--save_strategy steps``; the final step is saved
  as a checkpoint, so that rerunning the command recognizes the finished run and trains nothing).
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

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
)

from labo_hf import LABOTrainer, LABOTrainingArguments
from labo_hf.analysis.metrics import classification_metrics
from labo_hf.examples.cli_args import apply_config_overrides
from labo_hf.examples.data_checks import check_images
from labo_hf.examples.early_checks import check_sources, check_trainer_flags, one_thread_for_small_model
from labo_hf.examples.image_data import (
    AugmentationEpochCallback,
    ProcessedImageDataset,
    RandomCropFlip,
    SaveFinalStepCallback,
    check_image_folder,
    collate_fn,
    load_digits_dataset,
    load_image_folders,
    processed_size,
    scratch_image_processor,
    scratch_processor_class,
)
from labo_hf.examples.launch import hub_load_errors, shutdown_distributed
from labo_hf.examples.launch_lines import launch_help
from labo_hf.examples.runtime import (
    ExampleDataArguments,
    ExampleModelArguments,
    argument,
    load_hub_or_local,
    parse_args,
    start_run,
    train_evaluate_predict,
)

logger = logging.getLogger(__name__)

MODEL_TYPES = tuple(config.model_type for config in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING.keys())

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
    # Every parameter of a from-scratch model gets a gradient; transformers' default (True) makes DDP search for
    # unused ones at every step and warn that there are none.
    "ddp_find_unused_parameters": "false",
}

# Held out of the training data for evaluation when no validation data is given (--train_val_split).
DEFAULT_TRAIN_VAL_SPLIT = 0.15
LOCAL_MODEL_HINT = (
    "Pass a local checkpoint folder with --model_name_or_path, or train from scratch with --model_type vit "
    "(e.g. --config_overrides image_size=32,patch_size=4,hidden_size=128)."
)
LOCAL_DATA_HINT = "Pass local images with --train_dir/--validation_dir (folders or zips) instead."


# ---- Arguments ----


@dataclass
class ModelArguments(ExampleModelArguments):
    """Which model, config and image processor to train, and from where."""

    model_type: str | None = argument(
        "Model type to train from scratch, e.g. 'vit' (transformers' default config for that type, adjusted by "
        f"--config_overrides). With no model argument at all, a small ViT ({SMALL_VIT_CONFIG}) is used.",
        choices=list(MODEL_TYPES),
    )
    image_processor_name: str | None = argument(
        "Image processor (Hub id or local folder) if not the one of --model_name_or_path. From scratch, the model "
        "type's own processor resized to the config's image_size is used."
    )
    ignore_mismatched_sizes: bool = argument(
        "Load a checkpoint whose classification head has another number of classes (head re-initialized).", False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ignore_mismatched_sizes and self.model_name_or_path is None:
            raise ValueError("--ignore_mismatched_sizes only applies when loading --model_name_or_path")

    @property
    def uses_small_vit(self) -> bool:
        return self.model_name_or_path is None and self.model_type is None and self.config_name is None


@dataclass
class DataTrainingArguments(ExampleDataArguments):
    """Which data to train and evaluate on, and how to augment it."""

    train_dir: str | None = argument(
        "Training images: a folder <class>/<image>, or a .zip of <class>/<image> or <split>/<class>/<image>."
    )
    validation_dir: str | None = argument("Validation images, same layouts as --train_dir (needs --train_dir).")
    test_dir: str | None = argument("Test images for --do_predict, same layouts as --train_dir.")
    image_column_name: str | None = argument(
        "Image column of --dataset_name (default: the first column of type Image)."
    )
    label_column_name: str | None = argument(
        "Label column of --dataset_name (default: 'label' or 'labels', else the first ClassLabel)."
    )
    train_val_split: float | None = argument(
        "Fraction of the training data held out (stratified, seeded by --seed) for evaluation when no validation "
        f"data is given. Default (unset): {DEFAULT_TRAIN_VAL_SPLIT}."
    )
    horizontal_flip: bool | None = argument(
        "Random horizontal flips at training time. Default (unset): off for the digits default, on otherwise."
    )
    random_crop_padding: int | None = argument(
        "Random crop after zero-padding by this many pixels (at model input size) at training time. Default "
        "(unset): image_size // 8; 0 disables it."
    )
    skip_bad_images: bool = argument(
        "Leave out, and count, images that cannot be decoded (corrupt, empty, truncated) instead of stopping with "
        "an error naming them. Images are checked once per data set; the verdict is cached.", False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_val_split is not None and not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must lie in (0, 1); got {self.train_val_split}")
        if self.random_crop_padding is not None and self.random_crop_padding < 0:
            raise ValueError(f"--random_crop_padding must be >= 0; got {self.random_crop_padding}")
        if self.dataset_name is not None and (self.train_dir or self.validation_dir or self.test_dir):
            raise ValueError("--dataset_name cannot be combined with --train_dir/--validation_dir/--test_dir")

    @property
    def uses_digits(self) -> bool:
        return all(path is None for path in (self.dataset_name, self.train_dir, self.validation_dir, self.test_dir))


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
    """Parse the command line (or a single .json/.yaml file of arguments) into the three dataclasses, and
    check them against each other. Returns the dataclasses and the script defaults applied (flag -> value)."""
    (model_args, data_args, training_args), applied = parse_args(
        (ModelArguments, DataTrainingArguments, LABOTrainingArguments),
        argv,
        # --help starts with the usage commands and script defaults, verbatim, then the launch lines.
        description=__doc__ + launch_help("run_image_classification.py"),
        script_defaults=_script_defaults,
    )
    if data_args.validation_dir is not None and data_args.train_dir is None and training_args.do_train:
        raise ValueError(
            f"--validation_dir={data_args.validation_dir!r} was given without --train_dir, but training is on: "
            "pass --train_dir too, or --do_eval alone (with --model_name_or_path) to only evaluate."
        )
    if data_args.test_dir is not None and not training_args.do_predict:
        raise ValueError(f"--test_dir={data_args.test_dir!r} is only used by --do_predict; add --do_predict")
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise ValueError("Nothing to do: pass at least one of --do_train, --do_eval, --do_predict")
    _check_before_work(model_args, data_args, training_args)
    return model_args, data_args, training_args, applied


def _check_before_work(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: Any) -> None:
    """What would otherwise be refused only after the images are read (and --output_dir written)."""
    check_trainer_flags(training_args, "image classifiers")
    if training_args.do_predict and not (data_args.dataset_name or data_args.uses_digits or data_args.test_dir):
        raise ValueError("--do_predict needs a test split: pass --test_dir")
    if data_args.train_val_split is not None and (not training_args.do_eval or data_args.validation_dir):
        raise ValueError(
            f"--train_val_split={data_args.train_val_split} is unused: it only applies with --do_eval and "
            "training data without a validation split"
        )
    if model_args.model_name_or_path is None and model_args.config_name is None:
        config = _scratch_config(model_args)
        if model_args.image_processor_name is None:
            scratch_processor_class(config.model_type)


# ---- Data ----


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


def load_data(
    data_args: DataTrainingArguments, model_args: ModelArguments, training_args: Any
) -> tuple[DatasetDict, str, str, str]:
    """The splits the run needs, labelled with one ClassLabel, cut to --max_*_samples; with the data set's
    name for the model card and the image and label columns."""
    if data_args.dataset_name is not None:
        with training_args.main_process_first(desc="loading the dataset"):
            raw = load_hub_or_local(
                load_dataset, data_args.dataset_name, "--dataset_name", LOCAL_DATA_HINT, repo_type="dataset",
                name=data_args.dataset_config_name, cache_dir=model_args.cache_dir, token=model_args.token,
            )  # fmt: skip
        dataset_label = data_args.dataset_name
    elif data_args.uses_digits:
        raw, dataset_label = load_digits_dataset(), "sklearn-digits"
    else:
        raw = load_image_folders(data_args.train_dir, data_args.validation_dir, data_args.test_dir)
        folder = data_args.train_dir or data_args.validation_dir or data_args.test_dir
        dataset_label = os.path.basename(os.path.normpath(folder))
    raw = DatasetDict(raw)
    for alias in ("val", "valid"):
        if "validation" not in raw and alias in raw:
            raw["validation"] = raw.pop(alias)
    first_split = next(iter(raw.values()))
    image_column, label_column = _find_columns(first_split, data_args)
    if label_column is None:
        raise ValueError(f"No label column found in {list(first_split.features)}; pass --label_column_name")
    if not isinstance(first_split.features[label_column], ClassLabel):
        raw = _encode_labels(raw, label_column)

    if training_args.do_eval and "validation" not in raw and "train" in raw:
        # Hold out part of the training data for evaluation (only when evaluating: a train-only run keeps
        # all of it).
        test_size = data_args.train_val_split if data_args.train_val_split is not None else DEFAULT_TRAIN_VAL_SPLIT
        split = raw["train"].train_test_split(test_size=test_size, seed=training_args.seed,
                                              stratify_by_column=label_column)  # fmt: skip
        raw["train"], raw["validation"] = split["train"], split["test"]
    elif data_args.train_val_split is not None:  # a --dataset_name with its own validation split
        raise ValueError(
            f"--train_val_split={data_args.train_val_split} is unused: it only applies with --do_eval and "
            "training data without a validation split"
        )
    if data_args.uses_digits and training_args.do_predict:
        # The digits default has no third split; predict on the held-out 20% (documented in --help).
        raw["test"] = raw["validation"]
    wanted = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    flags = {"train": "--do_train", "validation": "--do_eval", "test": "--do_predict"}
    dirs = {"train": data_args.train_dir, "validation": data_args.validation_dir, "test": data_args.test_dir}
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_predict_samples}  # fmt: skip
    for split, needed in wanted.items():
        if needed and split not in raw:
            raise ValueError(f"{flags[split]} needs a {split} split; available: {list(raw)}")
        if split in raw and limits[split] is not None and limits[split] < len(raw[split]):
            raw[split] = raw[split].shuffle(seed=training_args.seed).select(range(limits[split]))
        if needed:  # every image decoded once now, rather than a crash mid-epoch
            held_out = data_args.train_dir and f"held out from --train_dir={data_args.train_dir}"
            source = data_args.dataset_name or dirs[split] or held_out or "the digits data"
            with training_args.main_process_first(desc=f"checking the {split} images"):
                raw[split], _ = check_images(raw[split], image_column, where=f"The {split} images ({source})",
                                             skip_bad_images=data_args.skip_bad_images, cache_dir=model_args.cache_dir,
                                             logger=logger)  # fmt: skip
    return raw, dataset_label, image_column, label_column


# ---- Model and image processor ----


def load_model(model_args: ModelArguments, class_names: list[str], do_train: bool) -> tuple[Any, Any]:
    """The model, pretrained or from scratch, with a head for ``class_names``, and its image processor."""
    label2id = {name: i for i, name in enumerate(class_names)}
    id2label = dict(enumerate(class_names))
    if model_args.model_name_or_path is not None or model_args.config_name is not None:
        config_source = model_args.config_name or model_args.model_name_or_path
        with hub_load_errors(config_source, "--config_name" if model_args.config_name else "--model_name_or_path",
                             LOCAL_MODEL_HINT):  # fmt: skip
            config = AutoConfig.from_pretrained(config_source, **model_args.hub_kwargs)
        if do_train:
            # A new label set for fine-tuning (the head is re-initialized when its size changes, with
            # --ignore_mismatched_sizes).
            config.num_labels, config.label2id, config.id2label = len(class_names), label2id, id2label
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
    else:
        config = _scratch_config(model_args)
        config.num_labels, config.label2id, config.id2label = len(class_names), label2id, id2label
        logger.info(f"Training a new {config.model_type} model from scratch (its config at --log_level debug)")
        logger.debug(f"Model config: {config}")

    if model_args.model_name_or_path is not None:
        with hub_load_errors(model_args.model_name_or_path, "--model_name_or_path", LOCAL_MODEL_HINT):
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path, config=config,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **model_args.hub_kwargs,
            )  # fmt: skip
    else:
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    num_parameters = sum(p.numel() for p in model.parameters()) / 1e6
    logger.info(f"Model: {type(model).__name__}, {num_parameters:.2f}M parameters, {len(class_names)} classes")

    processor_source = model_args.image_processor_name or model_args.model_name_or_path
    if processor_source is None:
        return model, scratch_image_processor(config)
    flag = "--image_processor_name" if model_args.image_processor_name else "--model_name_or_path"
    with hub_load_errors(processor_source, flag, LOCAL_MODEL_HINT):
        return model, AutoImageProcessor.from_pretrained(processor_source, **model_args.hub_kwargs)


def _scratch_config(model_args: ModelArguments) -> Any:
    """The from-scratch config: the model type's default (or the small ViT) with --config_overrides applied."""
    config = CONFIG_MAPPING[model_args.model_type or "vit"]()
    if model_args.uses_small_vit:
        config.update(SMALL_VIT_CONFIG)
    if model_args.config_overrides is not None:
        logger.info(f"Overriding config: {model_args.config_overrides}")
        apply_config_overrides(config, model_args.config_overrides)
    return config


# ---- Preprocessing, metrics and outputs ----


def make_augmentation(data_args: DataTrainingArguments, training_args: Any, image_processor: Any, config: Any):
    """Random crop and flip for training, or None when both are off."""
    input_size = processed_size(image_processor, config)
    padding = data_args.random_crop_padding if data_args.random_crop_padding is not None else input_size // 8
    flip = data_args.horizontal_flip if data_args.horizontal_flip is not None else not data_args.uses_digits
    logger.info(f"Training augmentation: random crop with padding {padding}, horizontal flip {flip}")
    black = image_processor(images=Image.new("RGB", (input_size, input_size)), return_tensors="np")
    return RandomCropFlip(
        padding=padding,
        horizontal_flip=flip,
        fill=black["pixel_values"][0][:, 0, 0],
        # data_seed, when set, is transformers' seed for data order; use it for the augmentation too.
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
    )


def build_compute_metrics():
    def compute_metrics(eval_prediction) -> dict[str, float]:
        # eval_nll comes from LABOTrainer (summed loss statistics), so it is not repeated here.
        metrics = classification_metrics(eval_prediction.predictions, eval_prediction.label_ids)
        metrics.pop("nll")
        return metrics

    return compute_metrics


def prediction_writer(class_names: list[str], output_dir: str):
    """Writes predict_results.txt: the predicted class of each test example."""

    def write(prediction: Any) -> None:
        predicted = np.asarray(prediction.predictions).argmax(axis=-1)
        path = os.path.join(output_dir, "predict_results.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("index\tprediction\n")
            f.writelines(f"{index}\t{class_names[label_id]}\n" for index, label_id in enumerate(predicted))
        logger.info(f"Predictions written to {path}")

    return write


def main(argv: list[str] | None = None) -> dict[str, float]:
    # 1. Arguments, with the script's defaults for the flags left unset; checked before anything is loaded.
    model_args, data_args, training_args, applied_defaults = parse_arguments(argv)
    for flag in ("train_dir", "validation_dir", "test_dir"):  # and every input exists, before any work
        check_image_folder(getattr(data_args, flag), f"--{flag}")
    check_sources(model_args, ("model_name_or_path", "config_name", "image_processor_name"), LOCAL_MODEL_HINT,
                  data_args.dataset_name, LOCAL_DATA_HINT)

    # 2. Logging, the launch check, the checkpoint to resume from, and the seed.
    checkpoint, identity = start_run(logger, training_args, applied_defaults, model_args=model_args, data_args=data_args)
    if model_args.uses_small_vit:
        one_thread_for_small_model(logger, training_args.device.type, "Small ViT")

    # 3. Data: a Hub data set, image folders or zips, or the digits default.
    raw, dataset_label, image_column, label_column = load_data(data_args, model_args, training_args)
    class_names = raw[next(iter(raw))].features[label_column].names
    if len(class_names) < 2:
        raise ValueError(f"Image classification needs at least 2 classes; found {class_names}")

    # 4. Model, config and image processor.
    model, image_processor = load_model(model_args, class_names, training_args.do_train)

    # 5. Preprocessing: the image processor when an example is read, plus augmentation for training.
    augmentation = make_augmentation(data_args, training_args, image_processor, model.config)
    augment = augmentation.padding > 0 or augmentation.horizontal_flip

    def wrap(split: str, needed: bool, augmented: bool = False) -> ProcessedImageDataset | None:
        if not needed:
            return None
        labels = label_column if label_column in raw[split].features else None
        return ProcessedImageDataset(raw[split], image_column, labels, image_processor,
                                     augmentation if augmented and augment else None)  # fmt: skip

    # 6. Trainer with the label regularizer selected by --label_regularizer.
    trainer = LABOTrainer(
        model=model,
        args=training_args,
        train_dataset=wrap("train", training_args.do_train, augmented=True),
        eval_dataset=wrap("validation", training_args.do_eval),
        processing_class=image_processor,
        data_collator=collate_fn,
        compute_metrics=build_compute_metrics(),
        callbacks=[AugmentationEpochCallback(augmentation)] + (
            [SaveFinalStepCallback()] if applied_defaults.get("save_strategy") == "no" else []
        ),
        run_identity=identity,
    )

    # 7. Training, evaluation, prediction (predict_results.txt) and the model card.
    all_metrics = train_evaluate_predict(
        trainer,
        checkpoint=checkpoint,
        predict_dataset=wrap("test", training_args.do_predict),
        write_predictions=prediction_writer(class_names, training_args.output_dir),
        model_card={
            "tasks": "image-classification", "tags": ["image-classification", "vision"], "dataset": dataset_label,
            "finetuned_from": model_args.model_name_or_path, "dataset_tags": data_args.dataset_name,
        },  # fmt: skip
    )
    if "eval_accuracy" in all_metrics and trainer.is_world_process_zero():
        print(f"eval_accuracy = {all_metrics['eval_accuracy']:.4f}")
    return all_metrics


if __name__ == "__main__":
    main()
    shutdown_distributed()
