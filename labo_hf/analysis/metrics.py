"""Classification metrics for evaluating label regularizers (pure numpy; torch tensors accepted).

Label regularizers (label smoothing, LABO) change a model's confidence as much as its accuracy, so
accuracy alone hides half of their effect. This module provides the metrics the example scripts
and benchmarks report side by side:

- :func:`accuracy` and :func:`top_k_accuracy`: the fraction of examples whose label is the argmax
  (or among the k highest logits).
- :func:`negative_log_likelihood`: mean ``-log p_y`` under ``softmax(logits)``, computed stably in
  float64.
- :func:`expected_calibration_error`: the standard equal-width-bin ECE (Guo et al., 2017) with 15
  bins by default.
- :func:`classification_metrics`: all of the above as one dict, ready to be returned from a
  ``compute_metrics`` function of a Hugging Face ``Trainer``.

Every function takes ``logits`` of shape ``(N, K)`` and integer ``labels`` of shape ``(N,)``, as numpy
arrays, torch tensors or nested lists. Rows whose label equals ``ignore_index`` (-100, the Hugging
Face convention) are dropped before computing anything, so that padding never counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_ECE_BINS",
    "accuracy",
    "classification_metrics",
    "expected_calibration_error",
    "log_softmax",
    "negative_log_likelihood",
    "top_k_accuracy",
]

DEFAULT_ECE_BINS = 15
"""Number of equal-width confidence bins used for ECE (the value of Guo et al., 2017)."""


def _to_numpy(array: Any) -> np.ndarray:
    # torch tensors (possibly on an accelerator, possibly bf16 which numpy lacks) are moved to the
    # CPU as float32/int64 first; everything else goes through np.asarray.
    if hasattr(array, "detach"):
        array = array.detach().cpu()
        if array.is_floating_point():
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def _prepare(logits: Any, labels: Any, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    logits = _to_numpy(logits)
    labels = _to_numpy(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K); got shape {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},) to match logits; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}")
    if ignore_index is not None:
        keep = labels != ignore_index
        logits, labels = logits[keep], labels[keep]
    num_classes = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (logits have {num_classes} classes); "
            f"got values in [{labels.min()}, {labels.max()}]"
        )
    return logits.astype(np.float64), labels.astype(np.int64)


def log_softmax(logits: Any) -> np.ndarray:
    """Row-wise ``log(softmax(logits))`` in float64, stable for large logits.

    Args:
        logits: array of shape ``(N, K)``.

    Returns:
        float64 array of shape ``(N, K)``.
    """
    logits = _to_numpy(logits).astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def accuracy(logits: Any, labels: Any, *, ignore_index: int | None = -100) -> float:
    """Top-1 accuracy: the fraction of examples whose label has the highest logit.

    Ties are resolved by ``argmax`` (lowest class index wins). Returns ``nan`` when no example is
    left after dropping ``ignore_index`` labels.
    """
    return top_k_accuracy(logits, labels, k=1, ignore_index=ignore_index)


def top_k_accuracy(logits: Any, labels: Any, *, k: int = 5, ignore_index: int | None = -100) -> float:
    """Fraction of examples whose label is among the ``k`` highest logits.

    For ``k=1`` ties are resolved like ``argmax`` (the lowest class index wins); for ``k > 1`` a
    label tied with the k-th highest logit counts as correct only if it is the lower index.
    Raises ``ValueError`` when ``k`` is not in ``[1, K]``. Returns ``nan`` for an empty input.
    """
    logits, labels = _prepare(logits, labels, ignore_index)
    num_classes = logits.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must lie in [1, {num_classes}] (the number of classes); got k={k}")
    if labels.size == 0:
        return float("nan")
    # A stable sort on the negated logits ranks equal logits by class index, which matches argmax
    # for k=1 and gives a deterministic answer for ties at the k-th place.
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top_k == labels[:, None]).any(axis=1).mean())


def negative_log_likelihood(logits: Any, labels: Any, *, ignore_index: int | None = -100) -> float:
    """Mean negative log-likelihood ``-log softmax(logits)[label]`` (natural log).

    This is plain cross-entropy against the one-hot label, whatever regularizer trained the model,
    so it is comparable across label smoothing, LABO and cross-entropy training. Returns ``nan``
    for an empty input.
    """
    logits, labels = _prepare(logits, labels, ignore_index)
    if labels.size == 0:
        return float("nan")
    log_probs = log_softmax(logits)
    return float(-log_probs[np.arange(labels.size), labels].mean())


def expected_calibration_error(
    logits: Any, labels: Any, *, num_bins: int = DEFAULT_ECE_BINS, ignore_index: int | None = -100
) -> float:
    """Expected calibration error with equal-width confidence bins (Guo et al., 2017).

    The confidence of an example is its top softmax probability and its prediction the argmax.
    Bin ``b`` (``b = 0 .. num_bins - 1``) holds the examples whose confidence lies in
    ``(b / num_bins, (b + 1) / num_bins]``; a confidence of exactly 0 (impossible for a softmax)
    would go to the first bin. Then::

        ECE = sum_b  |B_b| / N * | accuracy(B_b) - mean confidence(B_b) |

    Empty bins contribute nothing. The result lies in ``[0, 1]``; returns ``nan`` for an empty
    input.

    Args:
        logits: ``(N, K)`` unnormalized scores (softmax is applied here).
        labels: ``(N,)`` integer labels.
        num_bins: number of equal-width bins on ``[0, 1]`` (15 is the common choice).
        ignore_index: label value of rows to drop, or ``None`` to keep every row.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1; got {num_bins}")
    logits, labels = _prepare(logits, labels, ignore_index)
    if labels.size == 0:
        return float("nan")
    probs = np.exp(log_softmax(logits))
    confidences = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # ceil(conf * num_bins) - 1 maps (b/n, (b+1)/n] to b; the clip puts conf == 0 into bin 0 and
    # guards against conf marginally above 1 from rounding.
    bin_ids = np.clip(np.ceil(confidences * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    confidence_sums = np.bincount(bin_ids, weights=confidences, minlength=num_bins)
    correct_sums = np.bincount(bin_ids, weights=correct, minlength=num_bins)
    # |sum(correct) - sum(conf)| / N per bin equals |B|/N * |acc(B) - conf(B)|, without dividing
    # by empty bins.
    return float(np.abs(correct_sums - confidence_sums).sum() / labels.size)


def classification_metrics(
    logits: Any,
    labels: Any,
    *,
    num_bins: int = DEFAULT_ECE_BINS,
    top_k: int = 5,
    ignore_index: int | None = -100,
) -> dict[str, float]:
    """All evaluation metrics of the image-classification example in one dict.

    Keys: ``accuracy``, ``nll``, ``ece`` and, only when there are more classes than 10 (so that
    top-k is informative), ``top{top_k}_accuracy``. Also ``num_examples``: how many rows were
    scored, which lets a caller check that no example was dropped or duplicated (e.g. by
    multi-process evaluation).
    """
    logits_np, labels_np = _prepare(logits, labels, ignore_index)
    metrics = {
        "accuracy": accuracy(logits_np, labels_np, ignore_index=None),
        "nll": negative_log_likelihood(logits_np, labels_np, ignore_index=None),
        "ece": expected_calibration_error(logits_np, labels_np, num_bins=num_bins, ignore_index=None),
    }
    if logits_np.shape[1] > 10:
        metrics[f"top{top_k}_accuracy"] = top_k_accuracy(logits_np, labels_np, k=top_k, ignore_index=None)
    metrics["num_examples"] = float(labels_np.size)
    return metrics
