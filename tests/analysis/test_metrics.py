"""labo_hf.analysis.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labo_hf.analysis.metrics import (
    accuracy,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    top_k_accuracy,
)

# Two classes; logits = log(probabilities), so softmax gives the probabilities back exactly (up to
# rounding). Confidence, prediction, label, and the 15-bin bin (conf in (b/15, (b+1)/15]):
#   0.90 -> class 0, label 0, correct  -> bin 13
#   0.75 -> class 0, label 1, wrong    -> bin 11
#   0.70 -> class 1, label 1, correct  -> bin 10
#   0.72 -> class 0, label 1, wrong    -> bin 10
#   0.62 -> class 1, label 1, correct  -> bin 9
PROBS = np.array([[0.90, 0.10], [0.75, 0.25], [0.30, 0.70], [0.72, 0.28], [0.38, 0.62]])
LABELS = np.array([0, 1, 1, 1, 1])
LOGITS = np.log(PROBS)


def test_ece_hand_computed_15_bins():
    # ECE = 1/5 * (|1 - 0.90| + |0 - 0.75| + |(1 + 0) - (0.70 + 0.72)| + |1 - 0.62|)
    #     = (0.10 + 0.75 + 0.42 + 0.38) / 5 = 0.33
    assert expected_calibration_error(LOGITS, LABELS) == pytest.approx(0.33, abs=1e-12)


def test_ece_one_bin_is_accuracy_minus_mean_confidence():
    # |3/5 - (0.90 + 0.75 + 0.70 + 0.72 + 0.62) / 5| = |0.6 - 0.738| = 0.138
    assert expected_calibration_error(LOGITS, LABELS, num_bins=1) == pytest.approx(0.138, abs=1e-12)


def test_ece_perfectly_calibrated_and_boundaries():
    # Confidence 1 (one-hot-like logits) and always right: ECE 0.
    logits = np.array([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0]])
    assert expected_calibration_error(logits, np.array([0, 1])) == pytest.approx(0.0, abs=1e-12)
    # Uniform logits over 3 classes: confidence 1/3, argmax picks class 0; labels 0, 1, 2 -> accuracy 1/3.
    uniform = np.zeros((3, 3))
    assert expected_calibration_error(uniform, np.array([0, 1, 2])) == pytest.approx(0.0, abs=1e-12)
    # Same confidence 1/3 but always wrong: ECE = 1/3.
    assert expected_calibration_error(uniform, np.array([1, 1, 2])) == pytest.approx(1 / 3, abs=1e-12)


def test_accuracy_nll_and_ignore_index():
    assert accuracy(LOGITS, LABELS) == pytest.approx(0.6)
    expected_nll = -np.mean(np.log([0.90, 0.25, 0.70, 0.28, 0.62]))
    assert negative_log_likelihood(LOGITS, LABELS) == pytest.approx(expected_nll, rel=1e-12)
    # A row labelled -100 is dropped from every metric.
    logits = np.vstack([LOGITS, [[0.0, 9.0]]])
    labels = np.append(LABELS, -100)
    assert accuracy(logits, labels) == pytest.approx(0.6)
    assert expected_calibration_error(logits, labels) == pytest.approx(0.33, abs=1e-12)
    assert negative_log_likelihood(logits, labels) == pytest.approx(expected_nll, rel=1e-12)


def test_torch_inputs_and_extreme_logits():
    logits = torch.tensor(LOGITS, dtype=torch.bfloat16)
    assert accuracy(logits, torch.tensor(LABELS)) == pytest.approx(0.6)
    # Stable log-softmax: logits of +-1e4 give a finite NLL of exactly 2e4 for the wrong class.
    big = np.array([[1e4, -1e4]])
    assert negative_log_likelihood(big, np.array([1])) == pytest.approx(2e4)
    assert negative_log_likelihood(big, np.array([0])) == pytest.approx(0.0, abs=1e-12)


def test_top_k_accuracy():
    # 12 classes; the label is ranked 1st, 3rd, 5th and 6th in the four rows.
    logits = np.tile(np.arange(12, 0, -1, dtype=np.float64), (4, 1))  # class 0 highest, class 11 lowest
    labels = np.array([0, 2, 4, 5])
    assert top_k_accuracy(logits, labels, k=1) == pytest.approx(0.25)
    assert top_k_accuracy(logits, labels, k=3) == pytest.approx(0.5)
    assert top_k_accuracy(logits, labels, k=5) == pytest.approx(0.75)
    assert top_k_accuracy(logits, labels, k=12) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must lie in"):
        top_k_accuracy(logits, labels, k=13)


def test_classification_metrics_keys():
    metrics = classification_metrics(LOGITS, LABELS)
    assert set(metrics) == {"accuracy", "nll", "ece", "num_examples"}
    assert metrics["num_examples"] == 5.0
    assert metrics["ece"] == pytest.approx(0.33, abs=1e-12)
    # More than 10 classes: top-5 accuracy is added.
    rng = np.random.default_rng(0)
    metrics = classification_metrics(rng.normal(size=(20, 11)), rng.integers(0, 11, size=20))
    assert "top5_accuracy" in metrics and metrics["top5_accuracy"] >= metrics["accuracy"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        accuracy(LOGITS[:, 0], LABELS)
    with pytest.raises(ValueError, match="labels must lie in"):
        accuracy(LOGITS, np.array([0, 1, 2, 0, 0]))
    with pytest.raises(ValueError, match="integers"):
        accuracy(LOGITS, LABELS.astype(float))
    assert math.isnan(accuracy(LOGITS, np.full(5, -100)))
