"""Trainer glue: `LABOTrainer` and `LABOSeq2SeqTrainer`.

They replace the model's built-in loss by `labo_hf.losses.label_regularized_loss` and add training and
evaluation statistics to the logs. The loss math lives in `labo_hf.losses`; this module only decides what
goes in (logits, aligned labels, the normalizer) and what comes out (logs and metrics).

Reduction. The loss of one micro-batch is ``sum over its kept positions / N`` where ``N`` is the
Trainer's ``num_items_in_batch``: the kept positions of the whole accumulated batch, summed over all
processes when ``average_tokens_across_devices`` is on. DDP then averages gradients over processes, so
the loss is multiplied by the number of processes (as `transformers.Trainer.compute_loss` does for models
that take ``num_items_in_batch``); the optimizer step then sees ``global sum / global count`` whatever
the split over micro-batches and processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import EvalLoopOutput
from transformers.utils import logging

from .arguments import LabelRegularizationArgumentsMixin
from .losses import LossStats, check_loss_stats, label_regularized_loss_with_stats, resolve_hyperparameters
from .model_card import MODEL_CARD_MARKER, model_card_section, model_card_tags

logger = logging.get_logger(__name__)

__all__ = ["LABOSeq2SeqTrainer", "LABOTrainer", "LabelRegularization"]

_IGNORE_INDEX = -100  # transformers' convention; `Trainer._get_num_items_in_batch` counts `labels != -100`


class LabelRegularization(NamedTuple):
    """The label regularizer a trainer uses, with defaults filled in (for reporting)."""

    regularizer: str
    alpha: float
    temperature: float | None


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` (possibly PEFT-wrapped) is a decoder-only language model of transformers' causal-LM
    mapping."""
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class _LABOTrainerMixin:
    """Shared glue of `LABOTrainer` and `LABOSeq2SeqTrainer` (must precede the Trainer class in the bases)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        training_args = self.args
        if isinstance(training_args, LabelRegularizationArgumentsMixin):
            # Pass the user's values through unresolved: the loss resolves the defaults itself and refuses
            # e.g. an explicit alpha with cross_entropy, so resolving here would turn "unset" into "set".
            regularizer = training_args.label_regularizer
            alpha = training_args.label_regularizer_alpha
            temperature = training_args.labo_temperature
            resolved_alpha = training_args.resolved_label_regularizer_alpha
            resolved_temperature = training_args.resolved_labo_temperature
        else:
            if training_args.label_smoothing_factor != 0:
                # Plain arguments carry no regularizer choice; honouring label_smoothing_factor silently (or
                # ignoring it) would both surprise, so point to the arguments class that expresses it.
                raise ValueError(
                    f"label_smoothing_factor={training_args.label_smoothing_factor} is not used by "
                    f"{type(self).__name__}, which computes its own loss. Use LABOTrainingArguments / "
                    "LABOSeq2SeqTrainingArguments with label_regularizer='label_smoothing', "
                    f"label_regularizer_alpha={training_args.label_smoothing_factor} (CLI: --label_regularizer "
                    f"label_smoothing --label_regularizer_alpha {training_args.label_smoothing_factor}) "
                    "and label_smoothing_factor=0."
                )
            regularizer, alpha, temperature = "labo", None, None
            resolved_alpha, resolved_temperature = resolve_hyperparameters(regularizer, alpha, temperature)
        self._labo_loss_kwargs = {"regularizer": regularizer, "alpha": alpha, "temperature": temperature}
        self._label_regularization = LabelRegularization(regularizer, resolved_alpha, resolved_temperature)

        if self.compute_loss_func is not None:
            raise ValueError(
                f"compute_loss_func cannot be used with {type(self).__name__}: its loss is the label "
                "regularizer's. Use transformers.Trainer for a custom loss."
            )
        if list(self.label_names) != ["labels"]:
            raise ValueError(
                f"{type(self).__name__} needs class labels under the single key 'labels' "
                f"(got label_names={self.label_names}); LABO does not apply to e.g. span or multi-target heads."
            )
        # `model_accepts_loss_kwargs` drives two Trainer decisions: whether `num_items_in_batch` is counted
        # (`_get_num_items_in_batch`), and, with `loss_is_scaled_for_ga` left at None, whether the loss is
        # already normalized over the accumulated batch (`training_step` then does not divide it by the
        # accumulation steps again; it still does when no count was available and we divided by the local
        # count). Both hold for our `compute_loss` whatever the model's forward accepts, since it never
        # forwards loss kwargs to the model.
        self.model_accepts_loss_kwargs = True
        # Causal LMs predict label i+1 at position i. transformers decides this from `model.loss_type`, which
        # misses causal LMs without one (e.g. GPT2LMHeadModel, whose own loss still shifts); add the class-name
        # rule `Trainer.compute_loss` uses for its label smoother. The Trainer's flag is set to the same answer so
        # that `_get_num_items_in_batch` counts exactly the positions our loss keeps (`labels[..., 1:]`).
        self._labo_shift_labels = bool(getattr(self, "_loss_shifts_labels", False)) or _is_causal_lm(self.model)
        self._loss_shifts_labels = self._labo_shift_labels
        # Running sums (nll, target_prob, smoothing_entropy, count) kept on device without syncing;
        # "train" is reset at each training log, "eval" at the start of each evaluation loop.
        self._labo_stats: dict[str, torch.Tensor | None] = {"train": None, "eval": None}

    @property
    def label_regularization(self) -> LabelRegularization:
        """The regularizer, alpha and temperature this trainer uses, defaults filled in."""
        return self._label_regularization

    # ---- loss ----

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Label-regularized loss of one micro-batch.

        Runs the model without labels (its built-in loss never runs), aligns labels with the logits
        (shifted for causal LMs) and reduces by ``num_items_in_batch`` (see the module docstring).
        """
        if "labels" not in inputs:
            raise ValueError(f"{type(self).__name__}.compute_loss needs 'labels' in the batch")
        # Shallow copy: callers (e.g. `prediction_step`) keep using their dict after this call.
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        # Padding-free collators give pre-shifted causal-LM targets; the Trainer counts them when present.
        shift_labels = inputs.pop("shift_labels", None)
        # `Trainer.prediction_step` asks liger-patched models to skip the logits, which our loss needs.
        inputs.pop("skip_logits", None)
        if labels.is_floating_point():
            raise ValueError(
                "LABO needs integer class labels; got floating-point labels (regression or multi-label "
                "classification), which have no label to smooth."
            )

        unwrapped = self.accelerator.unwrap_model(model)
        if (
            getattr(getattr(unwrapped, "config", None), "is_encoder_decoder", False)
            and inputs.get("decoder_input_ids") is None
            and inputs.get("decoder_inputs_embeds") is None
        ):
            # Without labels the model cannot build its decoder inputs itself; do what it would have done.
            prepare = getattr(unwrapped, "prepare_decoder_input_ids_from_labels", None)
            if prepare is None:
                raise ValueError(
                    f"{type(model).__name__} has no prepare_decoder_input_ids_from_labels; provide "
                    "decoder_input_ids in the batch (e.g. with DataCollatorForSeq2Seq(model=model))."
                )
            inputs["decoder_input_ids"] = prepare(labels=labels)

        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        loss = self._labo_loss(
            logits,
            self._labo_targets(labels, shift_labels),
            self._labo_normalizer(num_items_in_batch),
            "train" if model.training else "eval",
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self._labo_process_scale()
        return (loss, outputs) if return_outputs else loss

    def _labo_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, normalizer: torch.Tensor | int | None, split: str
    ) -> torch.Tensor:
        """The label-regularized loss; records its statistics under `split` ("train" or "eval")."""
        loss, stats = label_regularized_loss_with_stats(
            logits, targets, ignore_index=_IGNORE_INDEX, num_items_in_batch=normalizer, **self._labo_loss_kwargs
        )
        if split == "eval":
            real_rows = self._labo_real_eval_rows(targets.shape[0])
            if real_rows < targets.shape[0]:
                # The final evaluation batch repeats samples to even out the processes; the statistics must
                # cover each sample once (as `gather_for_metrics` does for predictions). Only that batch pays
                # for this second, gradient-free pass over its real rows.
                with torch.no_grad():
                    _, stats = label_regularized_loss_with_stats(
                        logits[:real_rows].detach(), targets[:real_rows], ignore_index=_IGNORE_INDEX,
                        **self._labo_loss_kwargs,
                    )
        self._labo_record(stats, split)
        return loss

    def _labo_real_eval_rows(self, batch_rows: int) -> int:
        """How many leading rows of this process's current evaluation batch are real samples.

        With several processes, accelerate's dataloader (``even_batches``) completes the final global batch
        with repeats of the first samples; its ``remainder`` real samples come first in process order, which
        is what `Accelerator.gather_for_metrics` relies on to drop the repeats.
        """
        state = self.accelerator.gradient_state
        if (
            self.accelerator.num_processes == 1
            or not self.accelerator.even_batches
            or not state.end_of_dataloader
            or state.remainder <= 0
        ):
            return batch_rows
        before = self.accelerator.process_index * batch_rows
        return min(max(state.remainder - before, 0), batch_rows)

    def _labo_targets(self, labels: torch.Tensor, shift_labels: torch.Tensor | None) -> torch.Tensor:
        """Labels aligned position by position with the logits."""
        if shift_labels is not None:
            return shift_labels
        if self._labo_shift_labels:
            # Same loss as logits[..., :-1, :] against labels[..., 1:], but padding the (small) labels with one
            # ignored position leaves the (large) logits unsliced and contiguous, so no copy of them is made.
            return nn.functional.pad(labels[..., 1:], (0, 1), value=_IGNORE_INDEX)
        return labels

    def _labo_normalizer(self, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | int | None:
        """The loss denominator from the Trainer's ``num_items_in_batch``."""
        if torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim() > 0:
            # DataParallel (n_gpu > 1): the Trainer repeats the count once per GPU because it expects each
            # replica to compute a loss. Here the replicas' logits are gathered and the loss is computed once
            # on the whole batch, so the whole batch's count is needed: the repeated value when averaging across
            # devices, else the Trainer's per-GPU share (count // n_gpu) times n_gpu.
            count = num_items_in_batch.reshape(-1)[0]
            return count if self.args.average_tokens_across_devices else count * self.args.n_gpu
        return num_items_in_batch

    def _labo_process_scale(self) -> int:
        """Factor undoing the gradient averaging over processes (see the module docstring)."""
        if self.args.n_gpu > 1:
            # DataParallel: one loss on the gathered batch, nothing is averaged afterwards.
            return 1
        # Mirrors `Trainer.compute_loss`: tensor-parallel ranks share a batch and are not separate data shards.
        return self.accelerator.num_processes // self.get_tp_size()

    # ---- statistics ----

    def _labo_record(self, stats: LossStats, split: str) -> None:
        """Add one call's sums to the running sums of `split` (on device, no synchronization)."""
        values = torch.stack(
            [stats.nll_sum, stats.target_prob_sum, stats.smoothing_entropy_sum, stats.num_kept]
        ).detach()
        current = self._labo_stats[split]
        self._labo_stats[split] = values if current is None else current + values.to(current.device)

    def _labo_reduce(self, split: str, prefix: str) -> dict[str, float]:
        """Sum `split`'s running sums over processes, reset them, and turn them into per-position means.

        Collective when there are several processes: every process must call it at the same point.
        """
        values = self._labo_stats[split]
        self._labo_stats[split] = None
        if values is None:
            # This process saw no labelled batch; it still joins the collective with zeros.
            values = torch.zeros(4, device=self.args.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values.to(self.args.device), reduction="sum")
        nll, target_prob, smoothing_entropy, count = values.tolist()
        # The loss skips its host-syncing input checks on GPUs; an invalid batch left NaN in these sums.
        check_loss_stats((nll, target_prob, smoothing_entropy, count))
        if count == 0:
            return {}
        means = {"nll": nll / count, "target_prob": target_prob / count}
        if self._label_regularization.regularizer != "cross_entropy":
            means["smoothing_entropy"] = smoothing_entropy / count
        return {f"{prefix}{name}": value for name, value in means.items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the training statistics since the previous training log (``nll``, ``target_prob``,
        ``smoothing_entropy``: per-position means over all processes) to each training log."""
        # Only the periodic training logs carry "loss" (evaluation logs carry "eval_loss", the final summary
        # "train_loss"); they are emitted on every process, which the collective reduction requires.
        if "loss" in logs:
            logs.update(self._labo_reduce("train", prefix=""))
        super().log(logs, start_time)

    # ---- model card ----

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer.create_model_card` plus tags naming the label regularizer and its hyperparameters and a
        section describing it. Done here rather than appended afterwards because ``push_to_hub``
        regenerates the card through this method."""
        tags = kwargs.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        kwargs["tags"] = tags + [tag for tag in model_card_tags(*self._label_regularization) if tag not in tags]
        config = getattr(self.model, "config", None)
        from_scratch = kwargs.get("finetuned_from") is None and getattr(config, "_name_or_path", None) == ""
        if from_scratch:
            # transformers takes the empty name of a model built from a config for a base model and writes
            # "a fine-tuned version of []"; a local folder name makes it write "trained from scratch".
            config._name_or_path = self.args.output_dir
        try:
            super().create_model_card(*args, **kwargs)
        finally:
            if from_scratch:
                config._name_or_path = ""
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            card = f.read()
        if MODEL_CARD_MARKER not in card:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n" + model_card_section(*self._label_regularization))

    # ---- checkpoint reloading ----

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # transformers 5 saves some models (ViT among them) under their original Hub weight names, but
        # Trainer._load_from_checkpoint feeds those names to load_state_dict unconverted: every such weight is
        # reported "missing" and silently keeps its fresh initialization, so a resumed run diverges
        # (huggingface/transformers#43701, #48805). from_pretrained applies the conversion. `model` is only
        # passed for DeepSpeed/FSDP/SageMaker, left to transformers.
        if model is None and self._labo_can_reload(resume_from_checkpoint):
            logger.info(f"Loading model weights from {resume_from_checkpoint} (with weight-name conversion).")
            self._labo_reload_weights(resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        # Same conversion issue as in _load_from_checkpoint, for load_best_model_at_end.
        best = self.state.best_model_checkpoint
        if best is not None and self._labo_can_reload(best):
            logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
            self._labo_reload_weights(best)
            return
        super()._load_best_model()

    def _labo_can_reload(self, folder: str) -> bool:
        """Whether `folder` holds a plain checkpoint saved under other weight names than the model's own
        (then from_pretrained must convert them); checkpoints whose names match take transformers' path."""
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(self.model, "peft_config"))
        weights = os.path.join(folder, "model.safetensors")
        if not (plain and os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(weights)):
            return False
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as f:
            saved = set(f.keys())
        return not saved <= set(self.model.state_dict())

    def _labo_reload_weights(self, folder: str) -> None:
        reloaded = type(self.model).from_pretrained(folder, dtype=next(self.model.parameters()).dtype)
        # strict: a name still unmatched is an error rather than a silently untrained weight. Copying into the
        # existing parameters keeps them the ones the optimizer owns.
        self.model.load_state_dict(reloaded.state_dict(), strict=True)

    def evaluation_loop(
        self,
        dataloader: torch.utils.data.DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """`Trainer.evaluation_loop` plus ``{metric_key_prefix}_nll`` (plain cross-entropy per kept position
        over the whole evaluation set, comparable across regularizers), ``_target_prob`` and
        ``_smoothing_entropy``; used by both `evaluate` and `predict`."""
        self._labo_stats["eval"] = None
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        output.metrics.update(self._labo_reduce("eval", prefix=f"{metric_key_prefix}_"))
        return output


class LABOTrainer(_LABOTrainerMixin, Trainer):
    """`transformers.Trainer` training with a label regularizer (LABO by default).

    Configure it with `LABOTrainingArguments` (``label_regularizer``, ``label_regularizer_alpha``,
    ``labo_temperature``); plain `TrainingArguments` mean LABO with its default alpha and temperature.
    Works for sequence/image classification (logits (B, K), labels (B,)), token-level tasks and causal
    language models (labels shifted like transformers' causal-LM loss). Training logs gain ``nll``,
    ``target_prob`` and ``smoothing_entropy``; evaluation metrics gain ``eval_nll`` and friends.
    """


class LABOSeq2SeqTrainer(_LABOTrainerMixin, Seq2SeqTrainer):
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
        return self._labo_loss(logits, self._labo_targets(labels, None), None, "eval")
