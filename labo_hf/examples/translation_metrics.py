"""Scores and outputs of ``run_translation.py``: corpus BLEU and chrF of generated text against the raw
references, each example scored once, and the generated_predictions.txt writer."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import transformers
from sacrebleu.metrics import BLEU, CHRF

__all__ = ["build_compute_metrics", "prediction_writer", "strip_label_ids"]


def strip_label_ids(row: Any, pad_token_id: int) -> list[int]:
    """Token ids of one label row without padding (-100 from the collator, pad from the gather/padding)."""
    return [int(token) for token in row if token != -100 and token != pad_token_id]


def build_compute_metrics(
    tokenizer: Any,
    label_ids: list[list[int]],
    references: list[str],
    bleu_tokenize: str | None,
    target_lang: str,
):
    """compute_metrics for one data set: BLEU and chrF of the generated text against the raw references.

    Evaluation gathers predictions from all processes and pads the last batches with duplicates, so there
    can be more rows than examples: the rows past the data set's size are dropped, and the remaining rows
    are checked against the data set's own labels, so each example is scored exactly once and against its
    own reference (the raw text, not the lossy decoded labels).
    """
    pad_token_id = tokenizer.pad_token_id
    expected = [strip_label_ids(row, pad_token_id) for row in label_ids]
    bleu = BLEU(tokenize=bleu_tokenize, trg_lang=target_lang)
    chrf = CHRF()

    def compute_metrics(eval_preds: transformers.EvalPrediction) -> dict[str, float]:
        predictions, labels = eval_preds.predictions, eval_preds.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        num_examples = len(references)
        if len(predictions) < num_examples:
            raise RuntimeError(f"Got {len(predictions)} predictions for {num_examples} examples.")
        predictions, labels = predictions[:num_examples], labels[:num_examples]
        for index, row in enumerate(labels):
            if strip_label_ids(row, pad_token_id) != expected[index]:
                raise RuntimeError(
                    f"Evaluation output row {index} does not belong to example {index}: predictions are not in "
                    "data set order, so metrics would use the wrong references."
                )
        predictions = np.where(predictions != -100, predictions, pad_token_id)
        hypotheses = [text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        generated_lengths = [np.count_nonzero(row != pad_token_id) for row in predictions]
        return {
            "bleu": round(bleu.corpus_score(hypotheses, [references]).score, 4),
            "chrf": round(chrf.corpus_score(hypotheses, [references]).score, 4),
            "gen_len": round(float(np.mean(generated_lengths)), 4),
        }

    return compute_metrics


def prediction_writer(tokenizer: Any, output_dir: str, num_examples: int):
    """Writes generated_predictions.txt, one line per test example."""

    def write(predict_results: Any) -> None:
        # Rows past the data set's size are the duplicates that pad the last batches across processes.
        predictions = predict_results.predictions[:num_examples]
        predictions = np.where(predictions != -100, predictions, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        with open(os.path.join(output_dir, "generated_predictions.txt"), "w", encoding="utf-8") as writer:
            # A newline inside a generated text would shift every later line against the test set.
            writer.writelines(" ".join(text.split("\n")).strip() + "\n" for text in texts)

    return write
