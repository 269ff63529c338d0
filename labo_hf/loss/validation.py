"""Checking a call's inputs and reporting invalid ones, eagerly or later from the logged statistics.

Eager checks need host syncs, so they run by default only where those are free (``default_validate``);
elsewhere an invalid call poisons its ``LossStats`` with NaN and ``check_loss_stats`` raises later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from labo_hf.kernels.torch_rows import compute_dtype


class LossStats(NamedTuple):
    """Sums over the kept positions of one call, for logging (0-dim, detached; float32, or float64
    for float64 logits).

    Sums rather than means so that they add up across steps, micro-batches and processes. A call
    whose inputs were invalid but not checked eagerly (``validate=False``) leaves NaN in
    ``num_kept``; ``check_loss_stats`` turns that into the ValueError.
    """

    nll_sum: Tensor
    """Sum of -log p_y: plain cross-entropy, comparable across regularizers."""
    target_prob_sum: Tensor
    """Sum of p_y, the model's probability of the label."""
    smoothing_entropy_sum: Tensor
    """Sum of H(u): u* for labo, log K for label_smoothing, 0 for cross_entropy (no u)."""
    num_kept: Tensor
    """Number of kept positions (labels != ignore_index); NaN if the call was invalid."""


def flatten_inputs(
    logits: Tensor, labels: Tensor, ignore_index: int, *, check_range: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes (and the label range, a host sync, if asked); return logits (N, K), labels (N,)
    int64 and kept (N,) bool."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor of shape (..., K)")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        raise ValueError("labels must be an integer tensor of shape (...)")
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape (..., K) with K >= 2 classes, got {tuple(logits.shape)}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the class "
            f"dimension, {tuple(logits.shape[:-1])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    num_classes = logits.shape[-1]
    logits2d = logits.reshape(-1, num_classes)
    labels1d = labels.reshape(-1).long()
    kept = labels1d != ignore_index
    if check_range:
        check_label_range(labels1d, kept, num_classes, ignore_index)
    return logits2d, labels1d, kept


def check_label_range(labels: Tensor, kept: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise the ValueError naming kept labels outside [0, num_classes). A host sync: only call it when validating
    (unchecked, such labels poison their rows with NaN in the kernels instead)."""
    out_of_range = kept & ((labels < 0) | (labels >= num_classes))
    if bool(out_of_range.any()):
        bad = labels[out_of_range][:5].tolist()
        raise ValueError(f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; found {bad}")


def check_count(value: float, kept: Tensor | None) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"num_items_in_batch must be >= 0 and finite, got {value!r}")
    if value == 0 and kept is not None and bool(kept.any()):
        raise ValueError("num_items_in_batch=0 but labels has kept positions")


def raise_for_non_finite(logits2d: Tensor, labels: Tensor, kept: Tensor, regularizer: str) -> None:
    """Explain which input made a kept row's loss non-finite (only runs on failure)."""
    rows = logits2d[kept].to(compute_dtype(logits2d.dtype))
    y = labels[kept]
    if torch.isnan(rows).any():
        raise ValueError("logits contain NaN at kept positions")
    if torch.isposinf(rows).any():
        raise ValueError("logits contain +inf at kept positions")
    if torch.isneginf(rows.gather(1, y.unsqueeze(1))).any():
        raise ValueError("logits are -inf at a label's class: the cross-entropy is infinite")
    if regularizer == "label_smoothing" and torch.isneginf(rows).any():
        raise ValueError(
            "logits contain -inf at kept positions: label smoothing puts mass on every class, so "
            "the loss is infinite (LABO gives masked classes no mass)"
        )
    raise ValueError(
        f"the loss overflows {str(rows.dtype).removeprefix('torch.')} for these logits (largest |logit| "
        f"{rows.abs().max().item():.3g}); float64 logits are computed in float64"
    )


_LAZY_MESSAGE = (
    "label_regularized_loss: a call since the last check had invalid inputs (labels outside [0, K) other "
    "than ignore_index, NaN or +inf logits, -inf at a label or, for label smoothing, anywhere, logits whose "
    "loss overflows, or a num_items_in_batch that is negative, zero with kept positions, or not finite). "
    "Pass validate=True to label_regularized_loss to raise at the offending call with the exact reason."
)


def check_loss_stats(stats: LossStats | Tensor | Iterable[float]) -> None:
    """Raise the ValueError of an invalid call that was not validated eagerly (``validate=False``).

    Such calls poison their statistics with NaN on the device instead of synchronising. Call this
    where a host sync happens anyway, e.g. on the running sums of ``LossStats`` fields at a logging
    step (``LABOTrainer`` does, on every process's reduced sums).
    """
    if isinstance(stats, Tensor):
        values = stats.detach().reshape(-1).tolist()
    else:
        values = [float(v) for v in stats]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(_LAZY_MESSAGE)


# ---- the public functions ----------------------------------------------------------------------

def refuse_function_transforms(logits: Tensor) -> None:
    if torch._C._functorch.is_functorch_wrapped_tensor(logits):
        raise ValueError(
            "label_regularized_loss does not support torch.func transforms (grad, vmap, jacrev, ...) of "
            "logits: its fused kernels have no batching rule. Call it on the batch directly (it already "
            "reduces over rows), or use labo_hf.loss.reference.reference_label_regularized_loss."
        )


def default_validate(tensor: Tensor) -> bool:
    """Whether a call on ``tensor`` validates eagerly by default."""
    # Checking needs host syncs: free on CPU, a stall per call on a GPU, a graph break under compile.
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()
