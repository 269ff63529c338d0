"""labo-hf: LABO label regularization (optimal label smoothing) for Hugging Face Transformers.

The loss math is in ``labo_hf.loss.functional`` (pure torch), with ``labo_hf.loss.modules`` (``LABOLoss``) and
``labo_hf.loss.fused_linear`` (the loss from hidden states and lm_head weight) on top of it. ``labo_hf.hf.model_loss``
(``labo_loss_func``, a ``compute_loss_func`` for any Trainer), ``labo_hf.hf.apply`` (``apply_labo``: a model's own
loss), the Trainer subclasses in ``labo_hf.hf.trainers`` and their arguments in ``labo_hf.hf.arguments`` glue it in;
``labo_hf.hf.sft_trainer`` does the same for trl's SFTTrainer (trl is optional).
Importing this package does not import transformers until a Trainer class is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labo_hf.loss import (
    FusedLinearLABOLoss,
    LABOLoss,
    LossConfig,
    LossStats,
    check_loss_stats,
    fused_linear_label_regularized_loss,
    fused_linear_label_regularized_loss_with_stats,
    label_regularized_loss,
    label_regularized_loss_per_position,
    label_regularized_loss_with_stats,
    labo_target,
)

if TYPE_CHECKING:
    from labo_hf.hf.apply import LABOHandle, apply_labo, remove_labo
    from labo_hf.hf.arguments import LabelRegularization, LABOSeq2SeqTrainingArguments, LABOTrainingArguments
    from labo_hf.hf.loss_mixin import LABOLossMixin
    from labo_hf.hf.model_loss import LABOLossFunction, labo_loss_func
    from labo_hf.hf.run_guard import RunGuardMixin
    from labo_hf.hf.sft_trainer import LABOSFTConfig, LABOSFTTrainer
    from labo_hf.hf.trainers import LABOSeq2SeqTrainer, LABOTrainer
__all__ = [
    "FusedLinearLABOLoss",
    "LABOHandle",
    "LABOLoss",
    "LABOLossFunction",
    "LABOLossMixin",
    "LABOSFTConfig",
    "LABOSFTTrainer",
    "LABOSeq2SeqTrainer",
    "LABOSeq2SeqTrainingArguments",
    "LABOTrainer",
    "LABOTrainingArguments",
    "LabelRegularization",
    "LossConfig",
    "LossStats",
    "RunGuardMixin",
    "apply_labo",
    "check_loss_stats",
    "fused_linear_label_regularized_loss",
    "fused_linear_label_regularized_loss_with_stats",
    "label_regularized_loss",
    "label_regularized_loss_per_position",
    "label_regularized_loss_with_stats",
    "labo_loss_func",
    "labo_target",
    "remove_labo",
]

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

_LAZY = {
    "apply_labo": "labo_hf.hf.apply",
    "remove_labo": "labo_hf.hf.apply",
    "LABOHandle": "labo_hf.hf.apply",
    "LABOLossFunction": "labo_hf.hf.model_loss",
    "labo_loss_func": "labo_hf.hf.model_loss",
    "LABOLossMixin": "labo_hf.hf.loss_mixin",
    "RunGuardMixin": "labo_hf.hf.run_guard",
    "LABOTrainer": "labo_hf.hf.trainers",
    "LABOSeq2SeqTrainer": "labo_hf.hf.trainers",
    "LabelRegularization": "labo_hf.hf.arguments",  # the type of `trainer.label_regularization`
    "LABOTrainingArguments": "labo_hf.hf.arguments",
    "LABOSeq2SeqTrainingArguments": "labo_hf.hf.arguments",
    # trl is optional: only these two import it.
    "LABOSFTTrainer": "labo_hf.hf.sft_trainer",
    "LABOSFTConfig": "labo_hf.hf.sft_trainer",
}


def __getattr__(name: str) -> Any:
    # transformers takes seconds to import: only the Trainer glue pays for it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'labo_hf' has no attribute {name!r}")
