"""Fused linear + label-regularized loss: the loss of ``hidden @ weight.T + bias`` without the (N, V) logits.

For a causal LM with a vocabulary of 128k-256k entries, the logits and their gradient are most of a training
step's activation memory. Here the rows go through the lm_head in chunks: each chunk's logits, the gradient
of its summed loss (from the public `label_regularized_loss_with_stats`, at unit scale) and its
contributions to the hidden, weight and bias gradients (summed in float32) are computed in the forward pass,
and the chunk's logits are freed before the next. The call's loss is the sum times 1 / the one reducer's
denominator (`labo_hf.loss.functional`); backward scales the stored gradients by the upstream gradient times that
factor, in float32, and rounds them once.

Pure torch; imports nothing from transformers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from labo_hf.loss.config import LossConfig, chunk_elements
from labo_hf.loss.functional import label_regularized_loss_with_stats
from labo_hf.loss.reduction import reduction_scale
from labo_hf.loss.sharding import check_whole_weight
from labo_hf.loss.validation import LossStats, check_label_range, default_validate

__all__ = ["fused_linear_label_regularized_loss", "fused_linear_label_regularized_loss_with_stats"]


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None) -> None:
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point() or hidden.dim() != 2:
        raise ValueError("hidden must be a floating-point tensor of shape (N, H); flatten batch and sequence first")
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError("weight must be a floating-point tensor of shape (V, H), as nn.Linear(H, V).weight")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden.shape[1]}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be an integer tensor of shape ({hidden.shape[0]},), got "
                         f"{getattr(labels, 'shape', type(labels))}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {getattr(bias, 'shape', type(bias))}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(f"hidden, weight and bias must share one dtype, got {hidden.dtype} and {weight.dtype}"
                         + ("" if bias is None else f" and {bias.dtype}"))


class _FusedLinearLoss(torch.autograd.Function):
    """Loss and statistics of the kept rows; the gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, config, validate, scale, chunk_rows):  # noqa: D102
        needs = ctx.needs_input_grad[:3]
        want_grad = any(needs)
        loss_kwargs = config.loss_kwargs()
        kept_idx = (labels != config.ignore_index).nonzero().squeeze(1)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        loss_sum, nll_sum, target_prob_sum, entropy_sum, poison = (zero.clone() for _ in range(5))
        # Gradients in float32 until backward's final cast: under a loss scale (fp16) or in bf16, rounding each
        # chunk's contribution to the parameter dtype before the sum would lose precision.
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
        grad_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                     if bias is not None and needs[2] else None)
        # Only kept rows enter the lm_head: prompt tokens and padding cost nothing.
        for start in range(0, kept_idx.numel(), chunk_rows):
            idx = kept_idx[start:start + chunk_rows]
            h = hidden.index_select(0, idx)
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
            with torch.enable_grad():
                logits.requires_grad_(want_grad)
                # A sum (denominator 1): the logits' gradient is p - q at unit scale, so that fp16 does not
                # flush its small entries to 0 as it would after a division by the batch's count; 1 / count
                # joins the upstream gradient in backward, in float32.
                loss, stats = label_regularized_loss_with_stats(
                    logits, labels.index_select(0, idx), num_items_in_batch=1, validate=validate, **loss_kwargs
                )
                grad_logits = torch.autograd.grad(loss, logits)[0] if want_grad else None
            loss_sum += loss.detach()
            # An unvalidated invalid row (a label outside [0, V)) leaves NaN in the chunk's count: keep it.
            poison += torch.where(torch.isfinite(stats.num_kept), 0.0, math.nan)
            nll_sum += stats.nll_sum
            target_prob_sum += stats.target_prob_sum
            entropy_sum += stats.smoothing_entropy_sum
            del logits, loss
            if grad_hidden is not None:
                grad_hidden.index_add_(0, idx, (grad_logits @ weight).float())
            if grad_weight is not None:
                if grad_logits.dtype == torch.float32:
                    # In place: no (V, H) temporary per chunk.
                    grad_weight.addmm_(grad_logits.T, h)
                else:
                    # Low precision: the chunk's product goes to the float32 sum in blocks of rows of V, so the
                    # temporary is one block of about a chunk's logits in size, not a second (V, H) matrix.
                    grad_t = grad_logits.T
                    block = max(1, chunk_elements("fused_linear") // h.shape[1])
                    for v in range(0, grad_t.shape[0], block):
                        grad_weight[v:v + block].add_(grad_t[v:v + block] @ h)
                    del grad_t
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0, dtype=torch.float32))
            del grad_logits
        ctx.save_for_backward(scale, *(g if g is not None else zero for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.used = False
        num_kept = torch.tensor(float(kept_idx.numel()), device=hidden.device) + poison
        ctx.mark_non_differentiable(nll_sum, target_prob_sum, entropy_sum, num_kept)
        return loss_sum * scale, nll_sum, target_prob_sum, entropy_sum, num_kept

    @staticmethod
    def backward(ctx, grad_output, *unused):  # noqa: D102
        if ctx.used:
            raise RuntimeError(
                "fused_linear_label_regularized_loss: backward ran twice through the same forward; recompute the "
                "loss instead of using retain_graph=True"
            )
        ctx.used = True
        call_scale, *saved = ctx.saved_tensors
        scale = grad_output.float() * call_scale
        # In place: a second float32 copy of the (V, H) weight gradient would add its size to the peak.
        grads = [
            g.mul_(scale).to(dtype) if has else None
            for g, has, dtype in zip(saved, ctx.has, ctx.dtypes, strict=True)
        ]
        return grads[0], grads[1], grads[2], None, None, None, None, None


def fused_linear_label_regularized_loss_with_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    validate: bool | None = None,
) -> tuple[Tensor, LossStats]:
    """`fused_linear_label_regularized_loss` plus the sums needed to log it (see `LossStats`)."""
    check_whole_weight(weight)
    _check_inputs(hidden, weight, labels, bias)
    config = LossConfig(regularizer, alpha, temperature, ignore_index)  # fail before any work
    if chunk_size is None:
        chunk_size = max(1, chunk_elements("fused_linear") // weight.shape[0])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size!r}")
    validate = default_validate(hidden) if validate is None else bool(validate)
    labels = labels.to(hidden.device).long()
    kept = labels != ignore_index
    if validate:
        check_label_range(labels, kept, weight.shape[0], ignore_index)
    # The one reducer's rule and checks (no silent clamp of a zero, negative or non-finite count).
    scale, poison = reduction_scale(num_items_in_batch, kept, torch.float32, validate)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=hidden.device)
    loss, nll, target_prob, entropy, num_kept = _FusedLinearLoss.apply(
        hidden, weight, bias, labels, config, validate, scale, chunk_size
    )
    return loss, LossStats(nll_sum=nll, target_prob_sum=target_prob, smoothing_entropy_sum=entropy,
                           num_kept=num_kept + poison)


def fused_linear_label_regularized_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    validate: bool | None = None,
) -> Tensor:
    """`label_regularized_loss(hidden @ weight.T + bias, labels, ...)` without materializing the logits.

    Args:
        hidden: (N, H) final hidden states (flatten batch and sequence; align labels first, e.g. shifted).
        weight: (V, H) the lm_head weight, in hidden's dtype.
        labels: (N,) integer, in [0, V) or ``ignore_index``.
        bias: (V,) or None.
        regularizer, alpha, temperature, ignore_index, num_items_in_batch, validate: as `label_regularized_loss`
            (unvalidated, a label outside [0, V) gives NaN and poisons the `LossStats` instead of a ValueError).
        chunk_size: rows per chunk; default keeps a chunk's logits near 16M elements.

    Returns:
        0-dim float32 loss. Peak extra memory is a few chunks of (chunk_size, V) plus float32 copies of the
        gradients of hidden (N, H), weight (V, H) and bias, which are computed in the forward pass (only for
        the inputs that require a gradient); backward multiplies them in place by the upstream gradient, so it
        runs once per forward.
    """
    loss, _ = fused_linear_label_regularized_loss_with_stats(
        hidden, weight, labels, bias, regularizer=regularizer, alpha=alpha, temperature=temperature,
        ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, validate=validate,
    )
    return loss
