"""trl's `SFTTrainer` with a label regularizer: `LABOSFTTrainer`, configured by `LABOSFTConfig`.

Why not ``SFTTrainer(compute_loss_func=labo_loss_func(...))``: trl 1.16 deprecates ``compute_loss_func``, and with
one its ``compute_loss`` runs every micro-batch twice, once with gradients for the loss (full logits) and once more
without, through its fused LM head, for its entropy and token-accuracy metrics. `LABOSFTTrainer` runs one forward:
the loss is `LABOTrainer`'s (`LABOLossMixin` and `RunGuardMixin`, hence `LABOLossFunction`, exact under gradient
accumulation and DDP, with its ``nll``/``target_prob``/``smoothing_entropy`` logs, run record and atomic
checkpoints), and trl's ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` come from the same logits.

trl is an optional dependency: only this module imports it (``labo_hf.LABOSFTTrainer`` loads it on first use).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer

from labo_hf.hf.arguments import LabelRegularizationArgumentsMixin
from labo_hf.hf.loss_mixin import LABOLossMixin
from labo_hf.hf.model_card import LABO_PAPER, TAG_NAMES
from labo_hf.hf.model_loss import model_logits
from labo_hf.hf.run_guard import RunGuardMixin
from labo_hf.hf.trainers import CPUDataLoaderMixin, LABOModelCardMixin

__all__ = ["LABOSFTConfig", "LABOSFTTrainer"]

logger = logging.getLogger(__name__)

# Rows of logits turned into probabilities at a time for the metrics, so that they never hold a second (N, V) array.
_METRIC_ROWS = 1024


@dataclass
class LABOSFTConfig(LabelRegularizationArgumentsMixin, SFTConfig):
    """trl's `SFTConfig` plus the label-regularization fields of `LABOTrainingArguments` (``label_regularizer``,
    ``label_regularizer_alpha``, ``labo_temperature``, ``labo_fused_linear``).

    trl turns bf16 on by default; where this machine has no bf16 (a CPU without ``use_cpu=True``), transformers
    would refuse it, so the default becomes float32 instead, said in one log line. An explicit ``bf16=True`` is
    left for transformers to refuse.
    """

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16 and not _bf16_supported(self.use_cpu):
            logger.warning("LABOSFTConfig: no bf16 on this machine (no bf16 GPU, use_cpu not set): training in "
                           "float32 (pass bf16=False to choose it yourself)")
            self.bf16 = False
        super().__post_init__()


def _bf16_supported(use_cpu: bool) -> bool:
    """transformers' own condition for accepting ``bf16=True`` (`TrainingArguments.__post_init__`)."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()


class LABOSFTTrainer(CPUDataLoaderMixin, RunGuardMixin, LABOModelCardMixin, LABOLossMixin, SFTTrainer):
    """trl's `SFTTrainer` training with a label regularizer (LABO by default), in one forward per micro-batch.

    Configure it with `LABOSFTConfig`; a plain `SFTConfig` means LABO with its default alpha and temperature. Takes
    what `SFTTrainer` takes except ``compute_loss_func``, plus ``run_identity`` as `LABOTrainer`. Refused, with the
    reason: ``loss_type="dft"`` (another loss), a mixture-of-experts router loss (``router_aux_loss_coef``) and
    DeepSpeed sequence parallelism, which trl computes inside its own loss.
    """

    _tag_names = ["trl", "sft", *TAG_NAMES]
    _name = "SFT with label regularization"
    _paper = LABO_PAPER
    # trl's card template already cites `_paper`.
    _labo_card_cites = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.loss_type != "nll":
            raise ValueError(
                f"loss_type={self.args.loss_type!r} is another loss; {type(self).__name__} computes the label-"
                "regularized one. Leave loss_type='nll'."
            )
        if self.aux_loss_enabled:
            # trl adds the router loss inside its own compute_loss, which this trainer replaces.
            raise ValueError(
                f"{type(self).__name__} does not add a mixture-of-experts router loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef}); pass router_aux_loss_coef=0.0 to train without it."
            )
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            raise ValueError(f"{type(self).__name__} does not support sequence parallelism (sp_size > 1).")

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The label-regularized loss of one micro-batch (`LABOTrainer.compute_loss`), and trl's metrics from the
        same logits."""
        # As trl: a cache is useless when training and clashes with gradient checkpointing.
        inputs = {**inputs, "use_cache": False}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._labo_record_trl_metrics(outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _labo_record_trl_metrics(self, outputs: Any, inputs: dict[str, Any]) -> None:
        """trl's ``entropy`` and ``mean_token_accuracy`` (over the positions the loss keeps) and ``num_tokens``."""
        mode = "train" if self.model.training else "eval"
        if not self.labo_loss_function.last_fused:
            # The fused linear loss leaves no logits to measure; these two metrics are then not logged.
            logits = model_logits(outputs)
            targets = self.labo_loss_function.targets(outputs, inputs["labels"], inputs.get("shift_labels"))
            logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device)
            kept = targets != self.labo_loss_function.config.ignore_index
            entropy_sum = logits.new_zeros((), dtype=torch.float32)
            num_correct = torch.zeros((), dtype=torch.long, device=logits.device)
            for rows in torch.arange(logits.shape[0], device=logits.device).split(_METRIC_ROWS):
                chunk, keep = logits[rows].float(), kept[rows]
                log_probs = chunk.log_softmax(-1)
                entropy_sum += (-(log_probs.exp() * log_probs).sum(-1) * keep).sum()
                num_correct += ((chunk.argmax(-1) == targets[rows]) & keep).sum()
            num_valid = self.accelerator.gather_for_metrics(kept.sum()).sum()
            entropy_sum = self.accelerator.gather_for_metrics(entropy_sum).sum()
            num_correct = self.accelerator.gather_for_metrics(num_correct).sum()
            valid = num_valid.item()
            self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if valid > 0 else 0.0)
        if mode == "train":
            # As trl: padding-free batches have position_ids instead of an attention mask.
            if "attention_mask" in inputs:
                local_tokens = inputs["attention_mask"].sum()
            else:
                local_tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local_tokens).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
