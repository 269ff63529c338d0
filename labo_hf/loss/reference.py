"""The straightforward implementation of the label-regularized losses, kept as the reference.

It builds the full target distribution q (N, K) and lets autograd differentiate
``-sum_k q_k log p_k``. Every fast path (``labo_hf.loss.functional`` chunked torch path, the Triton
kernel) is tested for equality against it, and the benchmarks time it as the naive baseline.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from labo_hf.loss.config import resolve_hyperparameters

__all__ = [
    "reference_label_regularized_loss",
    "reference_label_regularized_loss_per_position",
    "reference_target_distribution",
]


def _compute_dtype(logits: Tensor) -> torch.dtype:
    # float64 inputs stay float64 so that tests can get a reference more exact than float32.
    return torch.promote_types(logits.dtype, torch.float32)


def reference_target_distribution(
    logits: Tensor, labels: Tensor, *, regularizer: str, alpha: float | None = None,
    temperature: float | None = None, ignore_index: int = -100,
) -> Tensor:
    """Target q = (1 - alpha) e_y + alpha u, (N, K) float32 (float64 for float64 logits) from logits (N, K), labels (N,).

    Rows of ignored positions are zero. For labo, a row whose non-target logits are all -inf
    has nowhere to put the smoothing mass, and its target is the one-hot label.
    """
    alpha, temperature = resolve_hyperparameters(regularizer, alpha, temperature)
    z = logits.detach().to(_compute_dtype(logits))
    kept = labels != ignore_index
    # In z's dtype: a float32 one-hot would round (1 - alpha) and alpha / K in the float64 reference.
    onehot = torch.nn.functional.one_hot(torch.where(kept, labels, 0).long(), z.shape[-1]).to(z.dtype)
    if regularizer == "labo":
        scaled = (z / temperature).masked_fill(onehot.bool(), -math.inf)
        has_mass = torch.isfinite(scaled.amax(dim=-1, keepdim=True))
        u = torch.where(has_mass, torch.softmax(scaled, dim=-1), 0.0)
        a = has_mass.to(z.dtype) * alpha  # not where(): its Python scalar would be float32
        q = (1 - a) * onehot + a * u
    elif regularizer == "label_smoothing":
        q = (1 - alpha) * onehot + alpha / z.shape[-1]
    else:
        q = onehot
    return q * kept.unsqueeze(-1)


def reference_label_regularized_loss_per_position(
    logits: Tensor, labels: Tensor, *, regularizer: str = "labo", alpha: float | None = None,
    temperature: float | None = None, ignore_index: int = -100,
) -> Tensor:
    """Same contract as ``label_regularized_loss_per_position``, computed with full (N, K) intermediates.

    Args:
        logits: (..., K); labels: (...). Returns (...) float32 (float64 for float64 logits), 0 at ignored
        positions.
    """
    num_classes = logits.shape[-1]
    z = logits.reshape(-1, num_classes).to(_compute_dtype(logits))
    q = reference_target_distribution(
        z, labels.reshape(-1), regularizer=regularizer, alpha=alpha, temperature=temperature,
        ignore_index=ignore_index,
    )
    logp = torch.log_softmax(z, dim=-1)
    # 0 * log p must stay 0 where q has no mass, even for -inf logits.
    return -torch.where(q > 0, q * logp, 0.0).sum(-1).reshape(labels.shape)


def reference_label_regularized_loss(
    logits: Tensor, labels: Tensor, *, regularizer: str = "labo", alpha: float | None = None,
    temperature: float | None = None, ignore_index: int = -100,
    num_items_in_batch: int | float | Tensor | None = None,
) -> Tensor:
    """Same contract as ``label_regularized_loss``, computed with full (N, K) intermediates.

    Args:
        logits: (..., K); labels: (...). Returns a 0-dim float32 loss.
    """
    total = reference_label_regularized_loss_per_position(
        logits, labels, regularizer=regularizer, alpha=alpha, temperature=temperature, ignore_index=ignore_index
    ).sum()
    y = labels.reshape(-1)
    if num_items_in_batch is None:
        denominator = (y != ignore_index).sum().clamp(min=1).float()
    elif isinstance(num_items_in_batch, Tensor):
        denominator = num_items_in_batch.float().clamp(min=1)
    else:
        denominator = max(float(num_items_in_batch), 1.0)
    return total / denominator
