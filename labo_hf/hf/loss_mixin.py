"""`LABOLossMixin`: the label-regularized loss of the LABO trainers and its logged statistics.

Reduction. The loss of one micro-batch is ``sum over its kept positions / N`` where ``N`` is the
Trainer's ``num_items_in_batch``: the kept positions of the whole accumulated batch, summed over all
processes when ``average_tokens_across_devices`` is on. DDP then averages gradients over processes, so
the loss is multiplied by the number of processes (as `transformers.Trainer.compute_loss` does for models
that take ``num_items_in_batch``); the optimizer step then sees ``global sum / global count`` whatever
the split over micro-batches and processes. Evaluation losses are each batch's mean over the real samples
of this process; the reported ``eval_loss`` is the mean over the kept positions of the whole evaluation set
(sum over all batches and processes / their kept count, as ``eval_nll``), whatever the batches hold.

The trainer reads the label regularization once, when built, and refuses later changes of ``args``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from accelerate.utils import DistributedType, parse_flag_from_env
from torch import nn
from transformers.trainer_utils import EvalLoopOutput
from transformers.utils import logging

from labo_hf.hf.arguments import LabelRegularization, read_label_regularization
from labo_hf.hf.model_loss import (
    LABOLossFunction,
    check_class_labels,
    is_causal_lm,
    model_logits,
    prepare_decoder_inputs,
)
from labo_hf.loss.validation import LossStats, check_loss_stats

__all__ = ["LABOLossMixin"]

logger = logging.get_logger(__name__)


class LABOLossMixin:
    """The loss and its statistics for a `transformers.Trainer` subclass (must precede the Trainer class in the
    bases). Training logs gain ``nll``, ``target_prob`` and ``smoothing_entropy``; evaluation metrics gain
    ``eval_nll`` and friends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._labo_config, self._label_regularization, self._labo_arguments_at_init = read_label_regularization(
            self.args, type(self).__name__
        )
        self._labo_predicting = False  # inside `prediction_step`

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
        self._labo_shift_labels = bool(getattr(self, "_loss_shifts_labels", False)) or is_causal_lm(self.model)
        self._loss_shifts_labels = self._labo_shift_labels
        # The loss itself is the one `labo_loss_func` gives plain Trainers: one implementation for every way in.
        # The model only for the fused loss's capture: compute_loss builds decoder inputs itself, so the loss
        # function's decoder-input check (for plain Trainers) is not wanted on the model.
        fused = bool(getattr(self.args, "labo_fused_linear", False))
        self._labo_loss_fn = LABOLossFunction.from_config(
            self._labo_config, shift_labels=self._labo_shift_labels, fused_linear=fused,
            model=self.model if fused else None,
        )
        self._labo_warn_if_fsdp_dropped()
        # Running sums (nll, target_prob, smoothing_entropy, count) kept on device without syncing;
        # "train" is reset at each training log, "eval" at the start of each evaluation loop.
        self._labo_stats: dict[str, torch.Tensor | None] = {"train": None, "eval": None}

    def _labo_warn_if_fsdp_dropped(self) -> None:
        """Warn when FSDP was asked for (``fsdp=`` or an accelerate FSDP config) but the run is not sharded.

        accelerate switches to FSDP only on accelerator devices; elsewhere (CPU) it runs DDP or a single process
        with the whole model on every process, which would otherwise go unnoticed.
        """
        requested = getattr(self.args, "fsdp_plugin_args", None) is not None or parse_flag_from_env(
            "ACCELERATE_USE_FSDP")
        kind = self.accelerator.distributed_type
        if not requested or self.is_fsdp_enabled or kind == DistributedType.FSDP:
            return
        instead = (f"DistributedDataParallel over {self.accelerator.num_processes} processes"
                   if self.accelerator.num_processes > 1 else "a single process")
        warnings.warn(
            f"FSDP was requested (TrainingArguments.fsdp or an accelerate FSDP config), but this run is not sharded: "
            f"accelerate runs {instead} (distributed_type {kind.value}, device {self.args.device.type}), each "
            "process holding the whole model. accelerate uses FSDP only on accelerator devices (CUDA, XPU, ...).",
            UserWarning, stacklevel=3,
        )

    @property
    def label_regularization(self) -> LabelRegularization:
        """The regularizer, alpha and temperature this trainer uses, defaults filled in."""
        return self._label_regularization

    @property
    def labo_loss_function(self) -> LABOLossFunction:
        """The `LABOLossFunction` computing this trainer's loss (the one `labo_loss_func` gives plain Trainers):
        its ``config``, ``last_stats`` and ``last_fused`` describe the latest call."""
        return self._labo_loss_fn

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
        check_class_labels(labels)
        prepare_decoder_inputs(self.accelerator.unwrap_model(model), inputs, labels)

        normalizer = self._labo_normalizer(num_items_in_batch)
        if model.training:
            # The fused loss runs inside the forward, where a sharded lm_head weight is whole.
            self._labo_loss_fn.expect(labels, normalizer, shift_labels)
        outputs = model(**inputs)
        loss = self._labo_loss(
            outputs, labels, normalizer, "train" if model.training else "eval",
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
        # Evaluation losses are means over this batch's kept positions (`_labo_normalizer`): times the count,
        # the batch's sum, from which `evaluation_loop` makes the whole set's mean.
        loss_sum = torch.where(stats.num_kept > 0, loss.detach() * stats.num_kept, 0.0) if split == "eval" else None
        self.record_loss_stats(stats, split, loss_sum)
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

    def record_loss_stats(self, stats: LossStats, split: str = "train", loss_sum: torch.Tensor | None = None) -> None:
        """Add one loss call's `LossStats` (and, in evaluation, its loss summed over kept positions) to the running
        sums of `split` ("train": logged and reset at the next training log; "eval": reported by the running
        evaluation), on device, without synchronizing. The trainer's own loss records itself; an overridden
        ``compute_loss`` adding another call's sums uses this."""
        if split not in self._labo_stats:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        loss_sum = torch.zeros_like(stats.nll_sum) if loss_sum is None else loss_sum.to(stats.nll_sum)
        values = torch.stack(
            [stats.nll_sum, stats.target_prob_sum, stats.smoothing_entropy_sum, stats.num_kept.to(stats.nll_sum),
             loss_sum]
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
            values = torch.zeros(5, device=self.args.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values.to(self.args.device), reduction="sum")
        nll, target_prob, smoothing_entropy, count, loss_sum = values.tolist()
        # The loss skips its host-syncing input checks on GPUs; an invalid batch left NaN in these sums.
        check_loss_stats((nll, target_prob, smoothing_entropy, count))
        if count == 0:
            return {}
        means = {"nll": nll / count, "target_prob": target_prob / count}
        if split == "eval":
            means["loss"] = loss_sum / count
        if self._label_regularization.regularizer != "cross_entropy":
            means["smoothing_entropy"] = smoothing_entropy / count
        return {f"{prefix}{name}": value for name, value in means.items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the training statistics since the previous training log (``nll``, ``target_prob``,
        ``smoothing_entropy``: per-position means over all processes) to each training log."""
        # Only the periodic training logs carry "loss" (evaluation logs carry "eval_loss", the final summary
        # "train_loss"); they are emitted on every process, which the collective reduction requires.
        if "loss" in logs:
            self.check_label_regularization_unchanged()
            logs.update(self._labo_reduce("train", prefix=""))
        super().log(logs, start_time)

    def check_label_regularization_unchanged(self) -> None:
        """Refuse a label regularization changed on ``trainer.args`` after the trainer was built.

        The loss was configured from the arguments once; honouring a later change in some places (summaries,
        cards) but not others (the loss) would misreport the method, so any change is an error.
        """
        _, _, current = read_label_regularization(self.args, type(self).__name__, validate=False)
        for name, before in self._labo_arguments_at_init.items():
            if current.get(name) != before:
                raise ValueError(
                    f"trainer.args.{name} was changed from {before!r} to {current.get(name)!r} after "
                    f"{type(self).__name__} was built. The trainer reads the label regularization once, when it "
                    f"is built (it uses {self._label_regularization}); build a new trainer with the new arguments."
                )

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
        self.check_label_regularization_unchanged()
        self._labo_stats["eval"] = None
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        evaluated_labels = self._labo_stats["eval"] is not None  # some batch with labels went through the loss
        means = self._labo_reduce("eval", prefix=f"{metric_key_prefix}_")
        if not means and evaluated_labels:
            # Every label position was ignored (-100): no loss is defined, which is said rather than hidden.
            logger.warning(f"Every label of the {description} set is ignored (-100): {metric_key_prefix}_loss and "
                           f"{metric_key_prefix}_nll are undefined (NaN).")
            means = {f"{metric_key_prefix}_loss": math.nan, f"{metric_key_prefix}_nll": math.nan}
        output.metrics.update(means)
        return output

