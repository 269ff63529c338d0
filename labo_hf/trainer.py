"""Trainer glue: `LABOTrainer` and `LABOSeq2SeqTrainer`.

They replace the model's built-in loss by `labo_hf.losses.label_regularized_loss` and add training and
evaluation statistics to the logs. The loss math lives in `labo_hf.losses`; this module only decides what
goes in (logits, aligned labels, the normalizer) and what comes out (logs and metrics).

Reduction. The loss of one micro-batch is ``sum over its kept positions / N`` where ``N`` is the
Trainer's ``num_items_in_batch``: the kept positions of the whole accumulated batch, summed over all
processes when ``average_tokens_across_devices`` is on. DDP then averages gradients over processes, so
the loss is multiplied by the number of processes (as `transformers.Trainer.compute_loss` does for models
that take ``num_items_in_batch``); the optimizer step then sees ``global sum / global count`` whatever
the split over micro-batches and processes. Evaluation losses are each batch's mean over the real samples
of this process, so ``eval_loss`` counts each sample once with any number of processes.

One run, one method. The trainers read the label regularization once, when built, and refuse later changes
of ``args``; they write the run's identity (`labo_hf.run_record`) into every folder they save, resume only
from complete checkpoints of the same run, and write checkpoints atomically (`labo_hf.checkpoints`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, rotate_checkpoints
from transformers.utils import logging

from ._compat import (
    checkpoint_needs_weight_conversion,
    loop_start_training_nothing,
    model_card_from_scratch_name,
    reload_weights_with_conversion,
)
from .arguments import LabelRegularizationArgumentsMixin
from .checkpoints import (
    STAGING_PREFIX,
    check_checkpoint_complete,
    find_last_complete_checkpoint,
    publish_checkpoint,
)
from .loss_func import LABOLossFunction, model_logits
from .losses import LossStats, check_loss_stats, resolve_hyperparameters
from .model_card import LABO_PAPER, MODEL_CARD_MARKER, TAG_NAMES, model_card_section, model_card_tags
from .run_record import check_same_run, read_run_record, write_run_record

logger = logging.get_logger(__name__)

__all__ = ["LABOSeq2SeqTrainer", "LABOTrainer", "LabelRegularization"]

_TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
# Argument fields the trainer reads once, when it is built (the last one belongs to plain TrainingArguments).
_LABEL_REGULARIZATION_FIELDS = ("label_regularizer", "label_regularizer_alpha", "labo_temperature",
                                "label_smoothing_factor")


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

    def __init__(self, *args: Any, run_identity: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
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
        self._labo_arguments_at_init = self._labo_argument_values()
        self._labo_run_identity = self._labo_build_run_identity(run_identity)
        self._labo_staging_root: str | None = None  # set while a checkpoint is being written
        self._labo_results_started = False
        self._labo_predicting = False  # inside `prediction_step`
        self._labo_resumed_complete = False  # `train` resumed from the final checkpoint of a finished run

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
        # The loss itself is the one `labo_loss_func` gives plain Trainers: one implementation for every way in.
        self._labo_loss_fn = LABOLossFunction(
            **self._labo_loss_kwargs, shift_labels=self._labo_shift_labels,
            fused_linear=bool(getattr(training_args, "labo_fused_linear", False)), model=self.model,
        )
        # Running sums (nll, target_prob, smoothing_entropy, count) kept on device without syncing;
        # "train" is reset at each training log, "eval" at the start of each evaluation loop.
        self._labo_stats: dict[str, torch.Tensor | None] = {"train": None, "eval": None}

    @property
    def label_regularization(self) -> LabelRegularization:
        """The regularizer, alpha and temperature this trainer uses, defaults filled in."""
        return self._label_regularization

    @property
    def resumed_complete_run(self) -> bool:
        """Whether the latest `train` call resumed from the final checkpoint of a finished run, and so trained no
        step."""
        return self._labo_resumed_complete

    @property
    def run_identity(self) -> dict[str, Any]:
        """What identifies this training run (see `labo_hf.run_record`): the label regularization, defaults
        filled in, plus the ``run_identity`` entries given to the constructor (e.g. model and data)."""
        return dict(self._labo_run_identity)

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
        loss = self._labo_loss(
            outputs, labels, self._labo_normalizer(num_items_in_batch), "train" if model.training else "eval",
            shift_labels=shift_labels,
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self._labo_process_scale()
        return (loss, outputs) if return_outputs else loss

    def _labo_loss(
        self, outputs: Any, labels: torch.Tensor, normalizer: torch.Tensor | int | None, split: str,
        shift_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The label-regularized loss of `outputs` (model outputs or logits); records its statistics under `split`
        ("train" or "eval")."""
        if split == "eval":
            logits = model_logits(outputs)
            targets = self._labo_loss_fn.targets(outputs, labels, shift_labels)
            real_rows = self._labo_real_eval_rows(targets.shape[0])
            if real_rows == 0:
                # Only repeats: `gather_for_metrics` drops every copy of this loss, and nothing is recorded.
                return logits[:0].sum()
            if real_rows < targets.shape[0]:
                # The final evaluation batch repeats samples to even out the processes. The Trainer gathers this
                # loss once per row and `gather_for_metrics` keeps the copies of the real rows only, so the
                # loss (like the statistics) must cover the real rows alone for eval_loss to count each sample
                # once, as with one process.
                outputs, labels, shift_labels = logits[:real_rows], None, targets[:real_rows]
        loss, stats = self._labo_loss_fn.loss_with_stats(outputs, labels, normalizer, shift_labels=shift_labels)
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

    def _labo_normalizer(self, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | int | None:
        """The loss denominator from the Trainer's ``num_items_in_batch``."""
        if self._labo_predicting:
            # Evaluation: each batch's loss is the mean over this process's real rows, as with one process. The
            # all-process count `prediction_step` passes would include the repeated samples of the final batch
            # and tie each process's value to the others' counts.
            return None
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
        if self._labo_predicting:
            return 1  # no gradients to average; see `_labo_normalizer`
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
            self._labo_check_arguments_unchanged()
            logs.update(self._labo_reduce("train", prefix=""))
        if self._labo_resumed_complete and "train_loss" in logs:
            # The summary of a call that trained no step: transformers would report train_loss 0.0.
            del logs["train_loss"]
        super().log(logs, start_time)

    # ---- model card ----

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
        self._labo_check_arguments_unchanged()
        tags = kwargs.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        ours = dict.fromkeys([*self._tag_names, *model_card_tags(*self._label_regularization)])
        kwargs["tags"] = tags + [tag for tag in ours if tag not in tags]
        with model_card_from_scratch_name(self.model, self.args.output_dir, kwargs.get("finetuned_from")):
            super().create_model_card(*args, **kwargs)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            card = f.read()
        if MODEL_CARD_MARKER not in card:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n" + model_card_section(*self._label_regularization, paper=self._paper,
                                                  cite=self._labo_card_cites))

    # ---- one run, one method: arguments read once, identity recorded and checked ----

    def _labo_argument_values(self) -> dict[str, Any]:
        return {name: getattr(self.args, name) for name in _LABEL_REGULARIZATION_FIELDS if hasattr(self.args, name)}

    def _labo_check_arguments_unchanged(self) -> None:
        """Refuse a label regularization changed on ``trainer.args`` after the trainer was built.

        The loss was configured from the arguments once; honouring a later change in some places (summaries,
        cards) but not others (the loss) would misreport the method, so any change is an error.
        """
        current = self._labo_argument_values()
        for name, before in self._labo_arguments_at_init.items():
            if current.get(name) != before:
                raise ValueError(
                    f"trainer.args.{name} was changed from {before!r} to {current.get(name)!r} after "
                    f"{type(self).__name__} was built. The trainer reads the label regularization once, when it "
                    f"is built (it uses {self._label_regularization}); build a new trainer with the new arguments."
                )

    def _labo_build_run_identity(self, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        regularizer, alpha, temperature = self._label_regularization
        identity = {"label_regularizer": regularizer, "label_regularizer_alpha": alpha, "labo_temperature": temperature}
        for key, value in (extra or {}).items():
            if key in identity and identity[key] != value:
                raise ValueError(
                    f"run_identity[{key!r}]={value!r} contradicts the trainer's arguments ({identity[key]!r})."
                )
            identity[key] = value
        return identity

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, resuming only from a complete checkpoint of the same run.

        ``resume_from_checkpoint=True`` takes the newest complete ``checkpoint-N`` of ``output_dir`` (incomplete
        ones are skipped with a warning); an explicit folder that is incomplete, or that records another
        label regularization (or model or data, when both sides record them), is a ``ValueError``.
        """
        self._labo_check_arguments_unchanged()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = find_last_complete_checkpoint(self.args.output_dir, logger)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint not in (None, False):
            folder = os.fspath(resume_from_checkpoint)
            check_checkpoint_complete(folder)
            check_same_run(
                read_run_record(folder), self.run_identity, f"Checkpoint {folder!r}",
                "Resume from a checkpoint of this run, or start a new run; to start from its weights alone, "
                "load them as the model (e.g. --model_name_or_path CHECKPOINT).",
            )
        self._labo_resumed_complete = False
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self._labo_resumed_complete:
            # No step ran in this call, so it has no training loss; the finished run's own is in its first results.
            output.metrics.pop("train_loss", None)
            output = output._replace(training_loss=math.nan)
        return output

    def _init_training_state(
        self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
        resume_from_checkpoint: str | None, trial: Any,
    ) -> tuple[int, int]:
        """`Trainer._init_training_state`, training nothing when the resumed checkpoint ends this very run.

        transformers would train one step past ``max_steps`` there (`labo_hf._compat`). A checkpoint past the end of
        a run of another length is a ``ValueError``: resuming cannot undo steps.
        """
        saved_max_steps = None
        if resume_from_checkpoint is not None:
            state_path = os.path.join(resume_from_checkpoint, _TRAINER_STATE_NAME)
            if os.path.isfile(state_path):
                with open(state_path, encoding="utf-8") as f:
                    saved_max_steps = json.load(f).get("max_steps")
        start = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        step = self.state.global_step
        if resume_from_checkpoint is None or step < max_steps:
            return start
        if saved_max_steps and saved_max_steps != max_steps:
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint!r} is at step {step} of a run of {saved_max_steps} steps, past "
                f"the end of this run of {max_steps} steps (max_steps={self.args.max_steps}, num_train_epochs="
                f"{self.args.num_train_epochs}); resuming cannot undo steps. Resume with the length of the run "
                f"that wrote it, resume from an earlier checkpoint, or start a new run in another output_dir."
            )
        logger.warning(
            f"Checkpoint {resume_from_checkpoint!r} is the end of this run (step {step} of {max_steps}): the run is "
            "already complete, so no step is trained and the model is the checkpoint's. No train_loss is reported "
            "for this call. To train further, raise max_steps or num_train_epochs."
        )
        self._labo_resumed_complete = True
        return loop_start_training_nothing(num_train_epochs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus the run record (``labo_run.json``) naming how the model was trained."""
        self._labo_check_arguments_unchanged()
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            write_run_record(output_dir if output_dir is not None else self.args.output_dir, self.run_identity)

    def save_metrics(self, split: str, metrics: dict[str, float], combined: bool = True) -> None:
        """`Trainer.save_metrics`, where ``all_results.json`` combines this trainer's results only.

        transformers merges into whatever ``all_results.json`` the folder already holds; results of an
        earlier run (another model, another regularizer) would then pass for this one's.
        """
        if combined and not self._labo_results_started and self.is_world_process_zero():
            stale = os.path.join(self.args.output_dir, "all_results.json")
            if os.path.exists(stale):
                logger.info(f"Replacing {stale} from an earlier run (its results are not merged into this run's).")
                os.remove(stale)
        if combined:
            self._labo_results_started = True
        super().save_metrics(split, metrics, combined=combined)

    # ---- atomic checkpoints ----
    # These overrides rely on how transformers 5.25.0's `Trainer._save_checkpoint` works (see
    # https://github.com/huggingface/transformers/blob/v5.25.0/src/transformers/trainer.py): it takes its run
    # folder from `_get_output_dir(trial)`, writes everything under ``run_dir/checkpoint-N``, then rotates and
    # pushes. tests/test_checkpoints.py fails if that changes.

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being written, transformers' `_save_checkpoint` writes into the staging folder.
        if self._labo_staging_root is not None:
            return self._labo_staging_root
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The upload runs in the background; started from the staging folder it would race with the rename.
        if self._labo_staging_root is None:
            super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """`Trainer._save_checkpoint`, atomic: the checkpoint appears complete or not at all.

        Every process writes into ``RUN_DIR/.tmp-checkpoint-N/checkpoint-N``; after a barrier, the process
        that saves for each filesystem adds a manifest and renames the folder to ``RUN_DIR/checkpoint-N``
        (`labo_hf.checkpoints`). Rotation and Hub pushes then see the final folder only.
        """
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # left by a save that was interrupted
        self.accelerator.wait_for_everyone()
        self._labo_staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._labo_staging_root = None
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                # The saved state must name the folder that will exist, not the staging one.
                self.state.save_to_json(os.path.join(staged, _TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)

    # ---- checkpoint reloading (transformers workarounds: labo_hf._compat) ----

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # `model` is only passed for DeepSpeed/FSDP/SageMaker, left to transformers.
        if model is None and self._labo_needs_weight_conversion(resume_from_checkpoint):
            logger.info(f"Loading model weights from {resume_from_checkpoint} (with weight-name conversion).")
            reload_weights_with_conversion(self.model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and self._labo_needs_weight_conversion(best):
            logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
            reload_weights_with_conversion(self.model, best)
            return
        super()._load_best_model()

    def _labo_needs_weight_conversion(self, folder: str) -> bool:
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(self.model, "peft_config"))
        return plain and checkpoint_needs_weight_conversion(self.model, folder)

    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        # Marks the losses computed inside as evaluation losses (see `_labo_normalizer`).
        self._labo_predicting = True
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            self._labo_predicting = False

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
        self._labo_check_arguments_unchanged()
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
        return self._labo_loss(logits, labels, None, "eval")
