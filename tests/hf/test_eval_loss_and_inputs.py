"""eval_loss over the whole evaluation set, and the trainers' input checks of issue 16: numpy scalars are
numbers, bool labels are refused (`LABOLossMixin`, `labo_hf.loss.config`, `labo_hf.hf.model_loss`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import IGNORE, collate, common_args, copy_examples, image_examples, tiny_marian, tiny_vit

from labo_hf.hf.arguments import LABOTrainingArguments
from labo_hf.hf.model_loss import labo_loss_func
from labo_hf.hf.trainers import LABOTrainer


def _evaluation_set() -> list[dict]:
    """Batches of 2 that keep very different numbers of positions: the last batch keeps none at all."""
    examples = copy_examples(6, seed=4, min_len=2, max_len=8)
    examples[1]["labels"] = examples[1]["labels"][:1] + [IGNORE] * (len(examples[1]["labels"]) - 1)
    for example in examples[4:]:
        example["labels"] = [IGNORE] * len(example["labels"])
    return examples


@pytest.mark.parametrize("regularizer, alpha", [("cross_entropy", None), ("label_smoothing", 0.2)])
def test_eval_loss_is_the_mean_over_the_kept_positions_of_the_whole_set(tmp_path, regularizer, alpha):
    model = tiny_marian().eval()
    examples = _evaluation_set()
    args = LABOTrainingArguments(**common_args(str(tmp_path)), per_device_eval_batch_size=2,
                                 label_regularizer=regularizer, label_regularizer_alpha=alpha)
    trainer = LABOTrainer(model=model, args=args, eval_dataset=examples, data_collator=collate)
    metrics = trainer.evaluate()
    # The reference: every batch as the evaluation loop forms it, the loss summed over kept positions.
    total, nll, count = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 2):
            batch = collate(examples[start:start + 2])
            logits, labels = model(**batch).logits, batch["labels"]
            kept = labels != IGNORE
            total += F.cross_entropy(logits[kept], labels[kept], reduction="sum",
                                     label_smoothing=alpha or 0.0).item()
            nll += F.cross_entropy(logits[kept], labels[kept], reduction="sum").item()
            count += int(kept.sum())
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["eval_nll"] == pytest.approx(nll / count, rel=1e-5)
    if regularizer == "cross_entropy":
        assert metrics["eval_loss"] == pytest.approx(metrics["eval_nll"], rel=1e-6)


def test_an_evaluation_set_whose_labels_are_all_ignored_says_so(tmp_path, caplog):
    examples = copy_examples(4, seed=4)
    for example in examples:
        example["labels"] = [IGNORE] * len(example["labels"])
    args = LABOTrainingArguments(**common_args(str(tmp_path)), per_device_eval_batch_size=2)
    trainer = LABOTrainer(model=tiny_marian(), args=args, eval_dataset=examples, data_collator=collate)
    with caplog.at_level("WARNING"):
        metrics = trainer.evaluate()
    assert math.isnan(metrics["eval_loss"]) and math.isnan(metrics["eval_nll"])
    assert "Every label of the Evaluation set is ignored (-100): eval_loss and eval_nll are undefined" in caplog.text


@pytest.mark.parametrize("scalar", [np.float32, np.float64, np.float16])
def test_numpy_scalars_are_numbers(tmp_path, scalar):
    args = LABOTrainingArguments(**common_args(str(tmp_path)), label_regularizer="labo",
                                 label_regularizer_alpha=scalar(0.25), labo_temperature=scalar(1.5))
    trainer = LABOTrainer(model=tiny_vit(), args=args, data_collator=collate)
    _, alpha, temperature = trainer.label_regularization
    assert alpha == pytest.approx(0.25) and temperature == pytest.approx(1.5)
    assert type(alpha) is float and type(temperature) is float
    labo_loss_func("label_smoothing", alpha=scalar(0.1))
    with pytest.raises(ValueError, match="alpha must be a number"):
        labo_loss_func("label_smoothing", alpha=np.bool_(True))


def test_bool_labels_are_refused(tmp_path):
    trainer = LABOTrainer(model=tiny_vit(), args=LABOTrainingArguments(**common_args(str(tmp_path))),
                          data_collator=collate)
    batch = collate(image_examples(4))
    batch["labels"] = batch["labels"] > 1
    with pytest.raises(ValueError, match="got bool labels"):
        trainer.compute_loss(trainer.model, batch)
