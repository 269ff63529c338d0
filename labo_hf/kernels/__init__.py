"""Per-row loss kernels: the layer below ``labo_hf.loss.functional``.

Every implementation (``torch_rows``: chunked pure torch; ``triton_rows``: fused Triton kernels)
provides the same two functions over a 2-D logits matrix (N, K):

* ``forward_rows(logits, labels, *, regularizer, alpha, temperature, ignore_index, ...) -> RowStats``
  reads the logits once and returns the per-row loss, the statistics to log, and the few per-row
  statistics the gradient needs. No (N, K) buffer outlives it.
* ``backward_rows(grad_rows, logits, labels, stats, *, ...) -> Tensor``
  re-reads the logits and writes ``grad_rows[i] * (p_i - q_i)`` once, in the logits' dtype, computed
  in float32 (float64 for float64 logits in the torch path).

Here p = softmax(z) and q = (1 - a) e_y + a u as in docs/method.md, section 1; u* of LABO is the
closed form of docs/method.md, section 3. Rows whose label is ``ignore_index`` get zero loss,
statistics and gradient and their logits are never trusted (they may hold NaN). A kept row whose
label lies outside [0, K) is poisoned with NaN (loss, statistics and gradient) instead of being read
out of bounds, so that the caller can report it without a host synchronisation.

This package imports nothing from ``labo_hf.loss.functional`` (which imports it): dependencies run one way,
kernels -> losses -> trainer -> scripts.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = [
    "LN2", "LOG2E", "MODES", "MODE_CROSS_ENTROPY", "MODE_LABEL_SMOOTHING", "MODE_LABO", "RowStats",
]

# Integer codes of the regularizers, shared by every implementation. Plain ints: the Triton kernels take them as
# ``tl.constexpr`` arguments (the branches are compiled away) and wrap them as ``tl.constexpr`` globals.
MODE_CROSS_ENTROPY = 0
MODE_LABEL_SMOOTHING = 1
MODE_LABO = 2
MODES = {"cross_entropy": MODE_CROSS_ENTROPY, "label_smoothing": MODE_LABEL_SMOOTHING, "labo": MODE_LABO}

# exp(x) = exp2(x * LOG2E) and ln(x) = log2(x) * LN2: the Triton kernels compute in base 2.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


class RowStats(NamedTuple):
    """Per-row results of ``forward_rows`` for N rows; every field is (N,) in the compute dtype
    (float32, or float64 for float64 logits in the torch path). Ignored rows are 0 everywhere."""

    loss: Tensor
    """H(q, p) per row."""
    nll: Tensor
    """-log p_y per row."""
    smoothing_entropy: Tensor
    """H(u) per row: H(u*) for labo, log K for label_smoothing, 0 for cross_entropy."""
    row_max: Tensor
    """max_k z_k, the shift of the softmax."""
    log_sum: Tensor
    """log sum_k exp(z_k - row_max), so that p_k = exp(z_k - row_max - log_sum)."""
    nt_max: Tensor
    """labo: max over the non-target classes of z_k; -inf when none is finite (then u* = 0). 0 otherwise."""
    log_sum_t: Tensor
    """labo: log sum_{k != y} exp((z_k - nt_max) / T), so that u*_k = exp((z_k - nt_max) / T - log_sum_t).
    0 otherwise."""

