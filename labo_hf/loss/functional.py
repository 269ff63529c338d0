"""Label-regularized losses: LABO, label smoothing and cross-entropy, as pure torch functions.

Every regularizer trains towards a target distribution per kept position

    q = (1 - alpha) * e_y + alpha * u

and its loss is the cross-entropy H(q, p) with p = softmax(logits). They differ only in u:

- ``"cross_entropy"``: alpha = 0 (no u).
- ``"label_smoothing"``: u uniform over all K classes (torch's ``label_smoothing`` convention).
- ``"labo"``: u = u*, the softmax of ``logits / temperature`` over the non-target classes
  (the closed-form solution of LABO's inner problem; see ``docs/method.md``, section 3).

The loss is reduced as the sum over kept positions (labels != ignore_index) divided by
``num_items_in_batch`` when given (the count over the whole accumulated, all-process batch)
and by the local kept count otherwise. ``label_regularized_loss_per_position`` returns the per-position
losses unreduced, from the same op.

Layering: the per-row math lives in ``labo_hf.kernels``; ``config`` checks the settings, ``validation``
the inputs, ``dispatch`` picks the kernels and owns the autograd op, ``reduction`` is the one reducer;
this module puts them together. It imports nothing from transformers.

Autograd contract (docs/method.md, section 4): the forward pass keeps a few per-row statistics,
the backward pass recomputes ``p - q`` from the logits in float32 and multiplies it by the upstream
gradient before rounding once to the logits' dtype (exact under fp16 loss scaling). The ops are
registered with ``torch.library`` so that ``torch.compile(fullgraph=True)`` traces them.
Second derivatives are not supported (a clear error; ``labo_hf.loss.reference`` is twice
differentiable), nor are ``torch.func`` transforms (a clear error).
"""


from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from labo_hf.kernels.torch_rows import compute_dtype as _compute_dtype
from labo_hf.loss.config import DEFAULT_TEMPERATURE, resolve_hyperparameters
from labo_hf.loss.dispatch import row_stats, select_implementation
from labo_hf.loss.reduction import reduction_scale
from labo_hf.loss.validation import (
    LossStats,
    default_validate,
    flatten_inputs,
    raise_for_non_finite,
    refuse_function_transforms,
)

__all__ = [
    "label_regularized_loss",
    "label_regularized_loss_per_position",
    "label_regularized_loss_with_stats",
    "labo_target",
]


def labo_target(logits: Tensor, labels: Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
                ignore_index: int = -100) -> Tensor:
    """LABO's optimal smoothing distribution u* (docs/method.md, section 3), for inspection and plots.

    Args:
        logits: (..., K) any float dtype; treated as constants.
        labels: (...) integer, in [0, K) or ``ignore_index``.
        temperature: T > 0; T -> inf tends to uniform over the K - 1 non-target classes.

    Returns:
        (..., K) float32: ``u*_k = softmax_{k != y}(z_k / T)`` and ``u*_y = 0``. Rows of ignored
        positions are all zero, and so are rows whose non-target logits are all -inf (there is no
        class to put smoothing mass on; the loss then trains towards the one-hot label).
    """
    _, temperature = resolve_hyperparameters("labo", None, temperature)
    logits2d, labels1d, kept = flatten_inputs(logits, labels, ignore_index)
    z = logits2d.detach().float()
    target = torch.zeros_like(z, dtype=torch.bool)
    target[kept, labels1d[kept]] = True
    u, _ = _labo_smoothing(z, target, temperature)
    # Ignored rows are defined as zero.
    return torch.where(kept.unsqueeze(-1), u, 0.0).reshape(logits.shape)


def _labo_smoothing(z: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """u* and log u* for rows z (M, K) float32 whose label positions are True in target (M, K).

    Rows with no finite non-target logit get u* = 0 (softmax would give 0/0 = NaN there).
    """
    scaled = (z / temperature).masked_fill(target, -math.inf)
    has_mass = torch.isfinite(scaled.amax(dim=-1, keepdim=True))
    log_u = torch.log_softmax(scaled, dim=-1)
    return torch.where(has_mass, log_u.exp(), 0.0), log_u


class _Call(NamedTuple):
    """One call's inputs after validation: logits (N, K), labels (N,) int64, kept (N,) bool, and the rest."""

    logits2d: Tensor
    labels1d: Tensor
    kept: Tensor
    regularizer: str
    alpha: float
    temperature: float | None
    ignore_index: int
    implementation: str
    validate: bool



def _prepare_call(logits: Tensor, labels: Tensor, regularizer: str, alpha: float | None,
                  temperature: float | None, ignore_index: int, implementation: str,
                  validate: bool | None) -> _Call:
    alpha, temperature = resolve_hyperparameters(regularizer, alpha, temperature)
    if validate is None:
        validate = default_validate(logits)
    if isinstance(logits, Tensor) and not torch.compiler.is_compiling():
        refuse_function_transforms(logits)
    logits2d, labels1d, kept = flatten_inputs(logits, labels, ignore_index, check_range=validate)
    implementation = select_implementation(implementation, logits)
    return _Call(logits2d, labels1d, kept, regularizer, alpha, temperature, int(ignore_index), implementation,
                 bool(validate))


def _row_losses(call: _Call) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels' per-row loss, NLL and H(u), each (N,) in the compute dtype, 0 at ignored rows.

    The loss is differentiable: its backward takes any per-row upstream gradient (N,). An invalid row
    (label out of range, logits that make its loss non-finite) is NaN or inf, or with ``validate`` the
    ValueError saying why.
    """
    row_loss, nll, entropy = row_stats(call.logits2d, call.labels1d, call.regularizer, call.alpha,
                                       call.temperature, call.ignore_index, call.implementation)
    if call.validate and not bool(torch.isfinite(row_loss).all()):
        raise_for_non_finite(call.logits2d.detach(), call.labels1d, call.kept, call.regularizer)
    return row_loss, nll, entropy


def label_regularized_loss_per_position(
    logits: Tensor,
    labels: Tensor,
    *,
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    ignore_index: int = -100,
    implementation: str = "auto",
    validate: bool | None = None,
) -> Tensor:
    """H(q, p) of every position, unreduced, through the same kernels as ``label_regularized_loss``.

    Args:
        logits: (..., K) float32, bf16 or fp16 (computed in float32), or float64 (computed in float64).
        labels: (...) integer, in [0, K) or ``ignore_index``.
        regularizer, alpha, temperature, ignore_index, implementation, validate: as
            ``label_regularized_loss``.

    Returns:
        (...) float32 (float64 for float64 logits), 0 at ignored positions. Backward takes any upstream
        gradient g (...) (per-position weights, a loss scale) and gives ``g * (p - q)`` per position,
        computed in float32 and rounded once to the logits' dtype; nothing of size (N, K) is kept between
        the passes. Without validation an invalid position's loss is NaN or inf instead of a ValueError.
    """
    call = _prepare_call(logits, labels, regularizer, alpha, temperature, ignore_index, implementation, validate)
    row_loss, _, _ = _row_losses(call)
    return row_loss.reshape(labels.shape)


def label_regularized_loss_with_stats(
    logits: Tensor,
    labels: Tensor,
    *,
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | Tensor | None = None,
    implementation: str = "auto",
    validate: bool | None = None,
) -> tuple[Tensor, LossStats]:
    """``label_regularized_loss`` plus the sums needed to log it (see ``LossStats``)."""
    call = _prepare_call(logits, labels, regularizer, alpha, temperature, ignore_index, implementation, validate)
    kept = call.kept
    dtype = _compute_dtype(logits.dtype)
    scale, poison = reduction_scale(num_items_in_batch, kept, dtype, call.validate)
    row_loss, nll, entropy = _row_losses(call)
    # The one reducer: backward hands every row the same upstream gradient, grad_output * scale.
    loss = row_loss.sum() * scale
    with torch.no_grad():
        # A non-finite row (an invalid input not checked eagerly) poisons the count.
        poison = poison + torch.where(torch.isfinite(row_loss).all(), 0.0, math.nan)
        stats = LossStats(
            nll_sum=nll.sum(),
            target_prob_sum=torch.where(kept, torch.exp(-nll), 0.0).sum(),
            smoothing_entropy_sum=entropy.sum(),
            num_kept=kept.sum().to(dtype) + poison,
        )
    return loss, stats


def label_regularized_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | Tensor | None = None,
    implementation: str = "auto",
    validate: bool | None = None,
) -> Tensor:
    """Label-regularized cross-entropy H(q, p), reduced over kept positions.

    Args:
        logits: (..., K) float32, bf16 or fp16 (computed in float32), or float64 (computed in float64).
        labels: (...) integer, in [0, K) or ``ignore_index``.
        regularizer: ``"labo"``, ``"label_smoothing"`` or ``"cross_entropy"``.
        alpha: smoothing mass in [0, 1); default 0.1. Must stay None for ``"cross_entropy"``.
        temperature: LABO's T >= 1e-30; default 2.0. Must stay None unless ``"labo"``.
        ignore_index: label value of positions that are skipped entirely.
        num_items_in_batch: kept positions in the whole (accumulated, all-process) batch, as the
            Trainer supplies it; None divides by the local kept count.
        implementation: ``"auto"`` (Triton for CUDA tensors when it imports, else torch),
            ``"torch"`` (chunked, pure torch) or ``"triton"``.
        validate: check the labels' range, a tensor ``num_items_in_batch`` and the loss's finiteness
            now, with host syncs, and raise the ValueError at this call. None (default): on for CPU
            logits outside ``torch.compile``, off otherwise. Off, an invalid call returns NaN and
            leaves NaN in its ``LossStats``; ``check_loss_stats`` raises the ValueError later.

    Returns:
        0-dim loss (float32; float64 for float64 logits). Its gradient w.r.t. the logits is p - q per
        kept position divided by the denominator, computed in the backward pass in float32 and
        rounded once. An all-ignored batch gives 0 with a zero gradient.

    Raises:
        ValueError: bad shapes or hyperparameters; with ``validate``, labels out of range, a bad
            count, or logits that make the loss non-finite (NaN or +inf, -inf at the label, any -inf
            for label smoothing, float32 overflow); torch.func transforms.
        RuntimeError: from a second derivative through the loss's gradient (create_graph=True).
    """
    loss, _ = label_regularized_loss_with_stats(
        logits,
        labels,
        regularizer=regularizer,
        alpha=alpha,
        temperature=temperature,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        implementation=implementation,
        validate=validate,
    )
    return loss
