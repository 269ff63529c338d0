"""The LABO trainers: `transformers.Trainer` and `Seq2SeqTrainer` with a label regularizer (LABO by default).

Each composes `RunGuardMixin` (run identity, atomic checkpoints, resume) and `LABOLossMixin` (the loss and its
statistics) with the transformers class, and owns the model card (tags and a "Label regularization (LABO)"
section, as trl's trainers do with ``_tag_names`` and ``_paper``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer

from labo_hf.hf._compat import model_card_from_scratch_name
from labo_hf.hf.arguments import LabelRegularization
from labo_hf.hf.loss_mixin import LABOLossMixin
from labo_hf.hf.model_card import (
    LABO_PAPER,
    MODEL_CARD_MARKER,
    TAG_NAMES,
    model_card_section,
    model_card_tags,
)
from labo_hf.hf.run_guard import RunGuardMixin

logger = logging.getLogger(__name__)

__all__ = ["CPUDataLoaderMixin", "LABOModelCardMixin", "LABOSeq2SeqTrainer", "LABOTrainer", "LabelRegularization"]


class LABOModelCardMixin:
    """The model card of the LABO trainers: `Trainer.create_model_card` plus LABO's tags and section."""

    # What every card of these trainers names, as trl's trainers do (`_tag_names`, `_paper`); the
    # regularizer-specific tags and section come from `label_regularization`.
    _tag_names = TAG_NAMES
    _paper = LABO_PAPER
    # Whether the appended section cites `_paper`; not where the card's own template already does (trl's).
    _labo_card_cites = True

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer.create_model_card` plus tags naming the label regularizer and its hyperparameters, and a
        "Label regularization (LABO)" section with the paper's citation. Done here rather than appended
        afterwards because ``push_to_hub`` regenerates the card through this method."""
        self.check_label_regularization_unchanged()
        # transformers drops the model-index results of a data set named without Hub tags (local data: "Dropping
        # the following result..."): the name stands in as its tag, and the `datasets:` metadata, which names
        # Hub data sets, is removed again below.
        local_dataset = bool(kwargs.get("dataset")) and not kwargs.get("dataset_tags")
        if local_dataset:
            if os.path.exists(str(kwargs["dataset"])):
                # A local folder's full path means nothing to a reader of the card: its name does.
                kwargs["dataset"] = os.path.basename(os.path.normpath(str(kwargs["dataset"])))
            kwargs["dataset_tags"] = kwargs["dataset"]
        tags = kwargs.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        ours = dict.fromkeys([*self._tag_names, *model_card_tags(*self._label_regularization)])
        kwargs["tags"] = tags + [tag for tag in ours if tag not in tags]
        # transformers logs "Dropping the following result..." for the results `_fill_model_index` puts back.
        card_logger = logging.getLogger("transformers.modelcard")
        level = card_logger.level
        card_logger.setLevel(max(level, logging.WARNING))
        try:
            with model_card_from_scratch_name(self.model, self.args.output_dir, kwargs.get("finetuned_from")):
                super().create_model_card(*args, **kwargs)
        finally:
            card_logger.setLevel(level)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.isfile(path):
            return
        if local_dataset:
            _drop_dataset_metadata(path)
        _fill_model_index(path, self.state.log_history, kwargs.get("tasks"), kwargs.get("dataset"),
                          kwargs.get("dataset_tags"))
        with open(path, encoding="utf-8") as f:
            card = f.read()
        if MODEL_CARD_MARKER not in card:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n" + model_card_section(*self._label_regularization, paper=self._paper,
                                                  cite=self._labo_card_cites))



class CPUDataLoaderMixin:
    """Turn off ``dataloader_pin_memory`` where there is no accelerator: pinning only speeds up copies to one, and
    without one torch ignores it with a UserWarning from every data loader, which the user cannot act on (the
    example scripts rely on this too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.dataloader_pin_memory and self.args.device.type == "cpu":
            logger.info("No accelerator: dataloader_pin_memory has no effect and is turned off.")
            self.args.dataloader_pin_memory = False


def _fill_model_index(path: str, log_history: list[dict[str, Any]], tasks: Any, dataset: Any, tags: Any) -> None:
    """Put the run's evaluation metrics into the card's empty model-index.

    transformers keeps model-index results only for the tasks of its ``TASK_TAG_TO_NAME_MAPPING``, which in 5.x has
    no translation or summarization, and drops the others ("Dropping the following result..."). Code:
    https://github.com/huggingface/transformers/blob/v5.25.0/src/transformers/modelcard.py (create_model_index).
    """
    from huggingface_hub import EvalResult, ModelCard
    from transformers.modelcard import infer_metric_tags_from_eval_results, parse_log_history

    task = tasks if isinstance(tasks, str) else (tasks or [None])[0]
    name = dataset if isinstance(dataset, str) else (dataset or [None])[0]
    tag = tags if isinstance(tags, str) else (tags or [name])[0]
    if not task or not name:
        return
    card = ModelCard.load(path)
    if card.data.eval_results:
        return
    _, _, eval_results = parse_log_history(log_history)
    metrics = infer_metric_tags_from_eval_results(eval_results)
    if not metrics:
        return
    card.data.eval_results = [
        EvalResult(task_type=task, dataset_type=tag or name, dataset_name=name, metric_type=metric,
                   metric_name=shown, metric_value=eval_results[shown])
        for metric, shown in metrics.items()
    ]
    card.save(path)


def _drop_dataset_metadata(path: str) -> None:
    """Remove the card's ``datasets:`` metadata (links to Hub data sets), keeping its model-index."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    if card.data.get("datasets") is not None:
        card.data.datasets = None
        card.save(path)


class LABOTrainer(CPUDataLoaderMixin, RunGuardMixin, LABOModelCardMixin, LABOLossMixin, Trainer):
    """`transformers.Trainer` training with a label regularizer (LABO by default).

    Configure it with `LABOTrainingArguments` (``label_regularizer``, ``label_regularizer_alpha``,
    ``labo_temperature``); plain `TrainingArguments` mean LABO with its default alpha and temperature.
    Works for sequence/image classification (logits (B, K), labels (B,)), token-level tasks and causal
    language models (labels shifted like transformers' causal-LM loss). Training logs gain ``nll``,
    ``target_prob`` and ``smoothing_entropy``; evaluation metrics gain ``eval_nll`` and friends.
    """


class LABOSeq2SeqTrainer(CPUDataLoaderMixin, RunGuardMixin, LABOModelCardMixin, LABOLossMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` training with a label regularizer (LABO by default).

    As `LABOTrainer`, configured with `LABOSeq2SeqTrainingArguments`. With ``predict_with_generate=True``,
    the evaluation loss and ``eval_nll`` still come from a teacher-forced pass with the label regularizer.
    """

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """`Seq2SeqTrainer.prediction_step`, with the label-regularized loss also when generating."""
        if not self.args.predict_with_generate or prediction_loss_only:
            # Goes through Trainer.prediction_step, hence through our compute_loss.
            return super().prediction_step(
                model, inputs, prediction_loss_only=prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
            )
        # When generating, Seq2SeqTrainer takes its loss from its own teacher-forced forward pass via
        # `self.label_smoother(outputs, labels)` (else the model's built-in loss), bypassing compute_loss.
        # Plugging our loss in there reuses that forward pass instead of running another one.
        saved = self.label_smoother
        self.label_smoother = self._labo_teacher_forced_loss
        try:
            return super().prediction_step(
                model, inputs, prediction_loss_only=prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
            )
        finally:
            self.label_smoother = saved

    def _labo_teacher_forced_loss(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """Evaluation loss of the generation path, from the logits of Seq2SeqTrainer's forward pass.

        Reduced by this batch's own kept count, like the per-batch losses of the non-generating path on one
        process; the exact corpus-level value is ``eval_nll``, from summed statistics.
        """
        # Seq2SeqTrainer passed the labels to the model, so a tuple output starts with the model's loss.
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[1]
        return self._labo_loss(logits, labels, None, "eval")
