"""Workarounds for transformers behaviour, in one place.

Each was written against transformers 5.25.0 (``pyproject.toml`` pins ``transformers>=5,<6``, since these
reach into private members that may change in a major release) and names the upstream code or issue it
works around. When a minimum version makes one unnecessary, delete it together with its call site.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = [
    "WRITTEN_AGAINST_TRANSFORMERS",
    "checkpoint_needs_weight_conversion",
    "loop_start_training_nothing",
    "model_card_from_scratch_name",
    "reload_weights_with_conversion",
    "scratch_image_processor_class",
]

WRITTEN_AGAINST_TRANSFORMERS = "5.25.0"


# ---- resuming and load_best_model_at_end -------------------------------------------------------------------
# transformers 5 saves some models (ViT among them) under their original Hub weight names, but
# `Trainer._load_from_checkpoint` and `Trainer._load_best_model` feed those names to `load_state_dict`
# unconverted: every such weight is reported "missing" and silently keeps its fresh initialization, so a
# resumed run diverges. `from_pretrained` applies the conversion.
# Upstream: https://github.com/huggingface/transformers/issues/43701 and
# https://github.com/huggingface/transformers/issues/48805; code:
# https://github.com/huggingface/transformers/blob/v5.25.0/src/transformers/trainer.py (_load_from_checkpoint).


def checkpoint_needs_weight_conversion(model: nn.Module, folder: str) -> bool:
    """Whether ``folder`` holds a single-file checkpoint saved under other weight names than ``model``'s own
    (then only ``from_pretrained`` loads it correctly); checkpoints whose names match take transformers' path.

    The caller excludes DeepSpeed, FSDP and PEFT checkpoints, which have their own formats."""
    weights = os.path.join(folder, "model.safetensors")
    if not (os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(weights)):
        return False
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        saved = set(f.keys())
    return not saved <= set(model.state_dict())


def reload_weights_with_conversion(model: nn.Module, folder: str) -> None:
    """Load ``folder``'s weights into ``model`` in place, through ``from_pretrained``'s name conversion."""
    reloaded = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype)
    # strict: a name still unmatched is an error rather than a silently untrained weight. Copying into the
    # existing parameters keeps them the ones the optimizer owns.
    model.load_state_dict(reloaded.state_dict(), strict=True)


# ---- resuming a run that is already complete ------------------------------------------------------------------
# transformers checks max_steps only after an optimizer step (`DefaultFlowCallback.on_step_end`), and a resumed
# run enters its epoch loop whenever the resumed epoch still has batches: resuming from the final checkpoint of a
# finished run (rerunning the same command) trains one step past max_steps and saves checkpoint-(N+1). Only
# when N ends an epoch is the loop ``for epoch in range(epochs_trained, num_train_epochs)`` empty, and nothing
# trains (the usual epoch-based case). `Trainer._init_training_state` returns the ``(epochs_trained,
# steps_trained_in_current_epoch)`` that loop starts from; the trainers return `loop_start_training_nothing`'s
# value for a complete run, which empties the loop in every case, as transformers does at an epoch boundary.
# Code: https://github.com/huggingface/transformers/blob/v5.25.0/src/transformers/trainer.py
# (_inner_training_loop, _init_training_state, _run_epoch).


def loop_start_training_nothing(num_train_epochs: int) -> tuple[int, int]:
    """What `Trainer._init_training_state` returns for `Trainer._inner_training_loop` to run no epoch, hence
    no step."""
    return num_train_epochs, 0


# ---- model card of a model built from a config --------------------------------------------------------------
# `TrainingSummary.from_trainer` takes `config._name_or_path` for the base model unless it is a local folder;
# a model built with `from_config` has the empty name, so the card reads "a fine-tuned version of []".
# Code: https://github.com/huggingface/transformers/blob/v5.25.0/src/transformers/modelcard.py
# (TrainingSummary.from_trainer, "Infer default finetuned_from").


@contextmanager
def model_card_from_scratch_name(model: nn.Module, output_dir: str, finetuned_from: str | None) -> Iterator[None]:
    """While the card is written, give a model built from a config a local folder's name, which makes
    transformers write "trained from scratch"; the empty name is restored afterwards."""
    config = getattr(model, "config", None)
    from_scratch = finetuned_from is None and getattr(config, "_name_or_path", None) == ""
    if from_scratch:
        config._name_or_path = output_dir
    try:
        yield
    finally:
        if from_scratch:
            config._name_or_path = ""


# ---- image processor of a model trained from scratch ---------------------------------------------------------
# There is no public way to get a model type's image processor class without a pretrained folder; the
# mapping below is a transformers-internal table whose values became {"pil": ..., "torchvision": ...}
# dicts in transformers 5. Code:
# https://github.com/huggingface/transformers/blob/v5.25.0/src/transformers/models/auto/image_processing_auto.py


def scratch_image_processor_class(model_type: str) -> Any | None:
    """The PIL-backed image processor class of ``model_type``, or None when transformers knows none."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    name = names.get("pil") if isinstance(names, dict) else None
    return None if name is None else getattr(transformers, name)
