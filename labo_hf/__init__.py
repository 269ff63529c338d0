"""labo-hf: LABO label regularization (optimal label smoothing) for Hugging Face Transformers.

The loss math is in ``labo_hf.losses`` (pure torch), with ``labo_hf.modules`` (``LABOLoss``) and
``labo_hf.fused_linear`` (the loss from hidden states and lm_head weight) on top of it. ``labo_hf.loss_func``
(``labo_loss_func``, a ``compute_loss_func`` for any Trainer), ``labo_hf.apply`` (``apply_labo``: a model's own
loss), the Trainer subclasses in ``labo_hf.trainer`` and their arguments in ``labo_hf.arguments`` glue it in;
``labo_hf.trl_trainer`` does the same for trl's SFTTrainer (trl is optional).
Importing this package does not import transformers until a Trainer class is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labo_hf.fused_linear import (
    fused_linear_label_regularized_loss,
    fused_linear_label_regularized_loss_with_stats,
)
from labo_hf.loss_func import LABOLossFunction, labo_loss_func
from labo_hf.losses import (
    LossStats,
    label_regularized_loss,
    label_regularized_loss_per_position,
    label_regularized_loss_with_stats,
    labo_target,
)
from labo_hf.modules import FusedLinearLABOLoss, LABOLoss

if TYPE_CHECKING:
    from labo_hf.apply import LABOHandle, apply_labo, remove_labo
    from labo_hf.arguments import LABOSeq2SeqTrainingArguments, LABOTrainingArguments
    from labo_hf.trainer import LabelRegularization, LABOSeq2SeqTrainer, LABOTrainer
    from labo_hf.trl_trainer import LABOSFTConfig, LABOSFTTrainer

__all__ = [
    "FusedLinearLABOLoss",
    "LABOHandle",
    "LABOLoss",
    "LABOLossFunction",
    "LABOSFTConfig",
    "LABOSFTTrainer",
    "LABOSeq2SeqTrainer",
    "LABOSeq2SeqTrainingArguments",
    "LABOTrainer",
    "LABOTrainingArguments",
    "LabelRegularization",
    "LossStats",
    "apply_labo",
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
    "apply_labo": "labo_hf.apply",
    "remove_labo": "labo_hf.apply",
    "LABOHandle": "labo_hf.apply",
    "LABOTrainer": "labo_hf.trainer",
    "LABOSeq2SeqTrainer": "labo_hf.trainer",
    "LabelRegularization": "labo_hf.trainer",  # the type of `trainer.label_regularization`
    "LABOTrainingArguments": "labo_hf.arguments",
    "LABOSeq2SeqTrainingArguments": "labo_hf.arguments",
    # trl is optional: only these two import it.
    "LABOSFTTrainer": "labo_hf.trl_trainer",
    "LABOSFTConfig": "labo_hf.trl_trainer",
}


def __getattr__(name: str) -> Any:
    # transformers takes seconds to import: only the Trainer glue pays for it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'labo_hf' has no attribute {name!r}")
