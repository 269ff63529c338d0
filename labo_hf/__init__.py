"""labo-hf: LABO label regularization (optimal label smoothing) for Hugging Face Transformers."""

from labo_hf.losses import (
    LossStats,
    label_regularized_loss,
    label_regularized_loss_with_stats,
    labo_target,
)

__all__ = [
    "LossStats",
    "label_regularized_loss",
    "label_regularized_loss_with_stats",
    "labo_target",
]

__version__ = "0.1.0"
