"""labo-hf: LABO label regularization (optimal label smoothing) for Hugging Face Transformers.

The loss math is in ``labo_hf.losses`` (pure torch); the Trainer subclasses in
``labo_hf.trainer`` and their arguments in ``labo_hf.arguments`` only glue it in.
Importing this package does not import transformers until a Trainer class is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labo_hf.losses import (
    LossStats,
    label_regularized_loss,
    label_regularized_loss_with_stats,
    labo_target,
)

if TYPE_CHECKING:
    from labo_hf.arguments import LABOSeq2SeqTrainingArguments, LABOTrainingArguments
    from labo_hf.trainer import LabelRegularization, LABOSeq2SeqTrainer, LABOTrainer

__all__ = [
    "LABOSeq2SeqTrainer",
    "LABOSeq2SeqTrainingArguments",
    "LABOTrainer",
    "LABOTrainingArguments",
    "LabelRegularization",
    "LossStats",
    "label_regularized_loss",
    "label_regularized_loss_with_stats",
    "labo_target",
]

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

_LAZY = {
    "LABOTrainer": "labo_hf.trainer",
    "LABOSeq2SeqTrainer": "labo_hf.trainer",
    "LabelRegularization": "labo_hf.trainer",  # the type of `trainer.label_regularization`
    "LABOTrainingArguments": "labo_hf.arguments",
    "LABOSeq2SeqTrainingArguments": "labo_hf.arguments",
}


def __getattr__(name: str) -> Any:
    # transformers takes seconds to import: only the Trainer glue pays for it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'labo_hf' has no attribute {name!r}")
