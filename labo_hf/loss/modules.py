"""`nn.Module` losses for custom training loops: `LABOLoss` (from logits) and `FusedLinearLABOLoss` (from the
final hidden states and the lm_head weight, without the logits).

Pure torch; imports nothing from transformers.
"""

from __future__ import annotations

from torch import Tensor, nn

from labo_hf.loss.config import LossConfig
from labo_hf.loss.functional import label_regularized_loss, label_regularized_loss_per_position
from labo_hf.loss.fused_linear import fused_linear_label_regularized_loss

__all__ = ["REDUCTIONS", "FusedLinearLABOLoss", "LABOLoss", "label_regularized_loss_per_position"]

REDUCTIONS = ("mean", "sum", "none")


class _ConfiguredLoss(nn.Module):
    """A loss module holding its validated settings (``config``, a frozen `LossConfig`) and its reduction."""

    def __init__(self, regularizer: str, alpha: float | None, temperature: float | None, ignore_index: int,
                 reduction: str) -> None:
        super().__init__()
        self.config = LossConfig(regularizer, alpha, temperature, ignore_index)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    # Read-only views of the settings, as the constructor's arguments (resolved: defaults filled in).
    regularizer = property(lambda self: self.config.regularizer)
    alpha = property(lambda self: self.config.alpha)
    temperature = property(lambda self: self.config.temperature)
    ignore_index = property(lambda self: self.config.ignore_index)

    def _num_items(self, num_items_in_batch):
        # "sum" is the reducer with denominator 1, so the three reductions share one code path.
        if num_items_in_batch is not None and self.reduction != "mean":
            raise ValueError(f"num_items_in_batch is only used by reduction='mean', not {self.reduction!r}")
        return 1 if self.reduction == "sum" else num_items_in_batch

    def extra_repr(self) -> str:  # noqa: D102
        settings = {**self.config.loss_kwargs(), "alpha": self.config.alpha, "reduction": self.reduction}
        return ", ".join(f"{k}={v!r}" for k, v in settings.items())


class LABOLoss(_ConfiguredLoss):
    """Label-regularized cross-entropy as a module: ``LABOLoss()(logits, labels)``.

    Args:
        regularizer, alpha, temperature, ignore_index: as `label_regularized_loss` (LABO, alpha 0.1, T 2 by
            default).
        reduction: ``"mean"`` (sum over kept positions / ``num_items_in_batch`` when forward gets it, else the
            local kept count), ``"sum"`` or ``"none"`` (per position, 0 at ignored ones).

    Forward: ``logits`` (..., K), ``labels`` (...), optional ``num_items_in_batch`` (the kept count of the whole
    accumulated, all-process batch, for exact gradient accumulation and data parallelism). Returns a 0-dim float32
    loss, or (...) float32 for ``"none"`` (`label_regularized_loss_per_position`: the same kernels, whose backward
    takes any per-position upstream gradient); float64 for float64 logits.
    """

    def __init__(self, regularizer: str = "labo", alpha: float | None = None, temperature: float | None = None,
                 ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(regularizer, alpha, temperature, ignore_index, reduction)

    def forward(self, logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:  # noqa: D102
        if self.reduction == "none":
            self._num_items(num_items_in_batch)
            return label_regularized_loss_per_position(logits, labels, **self.config.loss_kwargs())
        return label_regularized_loss(logits, labels, num_items_in_batch=self._num_items(num_items_in_batch),
                                      **self.config.loss_kwargs())


class FusedLinearLABOLoss(_ConfiguredLoss):
    """`LABOLoss` of ``hidden @ weight.T + bias`` without materializing the logits (for large vocabularies).

    Same arguments as `LABOLoss` plus ``chunk_size`` (rows per chunk); ``reduction="none"`` is not available
    (its per-position weights would be needed in the forward pass, where the gradients are computed).

    Forward: ``hidden`` (N, H), ``weight`` (V, H) (e.g. ``model.get_output_embeddings().weight``), ``labels``
    (N,) aligned with the hidden rows (shifted for causal LMs), optional ``bias`` (V,) and
    ``num_items_in_batch``. Returns a 0-dim float32 loss.
    """

    def __init__(self, regularizer: str = "labo", alpha: float | None = None, temperature: float | None = None,
                 ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None) -> None:
        if reduction == "none":
            raise ValueError("reduction='none' is not available for the fused linear loss; use LABOLoss on logits")
        super().__init__(regularizer, alpha, temperature, ignore_index, reduction)
        self.chunk_size = chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,  # noqa: D102
                num_items_in_batch: int | Tensor | None = None) -> Tensor:
        return fused_linear_label_regularized_loss(
            hidden, weight, labels, bias, num_items_in_batch=self._num_items(num_items_in_batch),
            chunk_size=self.chunk_size, **self.config.loss_kwargs(),
        )
