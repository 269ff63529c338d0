"""The loss layer: label-regularized cross-entropy (LABO, label smoothing, cross-entropy) as pure torch.

``config`` (settings and defaults) -> ``validation`` (input checks, ``LossStats``) -> ``reduction`` (the one
reducer) -> ``dispatch`` (kernel choice and the autograd op over ``labo_hf.kernels``) -> ``functional`` (the
public functions) -> ``fused_linear`` (from hidden states and the lm_head weight) -> ``modules`` (``nn.Module``
losses). ``reference`` is the straightforward autograd path every fast path is tested against. Nothing here
imports transformers.
"""

from __future__ import annotations

from labo_hf.loss.config import (
    DEFAULT_ALPHA,
    DEFAULT_TEMPERATURE,
    IMPLEMENTATIONS,
    MIN_TEMPERATURE,
    REGULARIZERS,
    LossConfig,
    resolve_hyperparameters,
)
from labo_hf.loss.functional import (
    label_regularized_loss,
    label_regularized_loss_per_position,
    label_regularized_loss_with_stats,
    labo_target,
)
from labo_hf.loss.fused_linear import (
    fused_linear_label_regularized_loss,
    fused_linear_label_regularized_loss_with_stats,
)
from labo_hf.loss.modules import REDUCTIONS, FusedLinearLABOLoss, LABOLoss
from labo_hf.loss.validation import LossStats, check_loss_stats

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_TEMPERATURE",
    "IMPLEMENTATIONS",
    "MIN_TEMPERATURE",
    "REDUCTIONS",
    "REGULARIZERS",
    "FusedLinearLABOLoss",
    "LABOLoss",
    "LossConfig",
    "LossStats",
    "check_loss_stats",
    "fused_linear_label_regularized_loss",
    "fused_linear_label_regularized_loss_with_stats",
    "label_regularized_loss",
    "label_regularized_loss_per_position",
    "label_regularized_loss_with_stats",
    "labo_target",
    "resolve_hyperparameters",
]
