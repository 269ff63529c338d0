"""The label-regularized loss of a transformers model's outputs: one implementation for every way in.

`LABOLossFunction` turns ``(outputs, labels, num_items_in_batch)`` into the loss: it aligns the labels with the
logits (shifted for causal LMs) and reduces by ``num_items_in_batch``, from the logits or, with
``fused_linear=True``, from the captured final hidden states and the lm_head weight. `labo_loss_func` builds one
for ``Trainer(compute_loss_func=...)`` (plain `transformers.Trainer`, `Seq2SeqTrainer`, trl's `SFTTrainer`);
`LABOTrainer` and `apply_labo` call the same object.

Reduction under gradient accumulation and data parallelism: the Trainers pass ``num_items_in_batch``, the kept
positions of the whole accumulated batch over all processes (with ``average_tokens_across_devices``, the
default), and multiply a ``compute_loss_func``'s loss by the number of processes, undoing DDP's gradient mean. The
loss here is ``sum over this micro-batch's kept positions / num_items_in_batch``, so the optimizer step sees the
global sum over the global count however the batch is split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch import bool as torch_bool

from labo_hf.hf.lm_head import LinearHeadCapture
from labo_hf.loss.config import LossConfig
from labo_hf.loss.functional import label_regularized_loss_with_stats
from labo_hf.loss.fused_linear import fused_linear_label_regularized_loss_with_stats
from labo_hf.loss.validation import LossStats

logger = logging.getLogger(__name__)

# Calls during which `LABOLossFunction` compares num_items_in_batch with its labels (each check reads two counts
# back from the device, so it stops after the first steps).
_COUNT_CHECK_CALLS = 16

__all__ = ["LABOLossFunction", "check_class_labels", "is_causal_lm", "labo_loss_func", "model_logits", "prepare_decoder_inputs"]


def check_class_labels(labels: Tensor | None) -> None:
    """Refuse labels that are not class indices: floating-point labels (regression, multi-label) have no label to
    smooth."""
    if labels is not None and labels.is_floating_point():
        raise ValueError("LABO needs integer class labels; got floating-point labels (regression or multi-label "
                         "classification have no label to smooth)")
    if labels is not None and labels.dtype is torch_bool:
        raise ValueError("LABO needs integer class labels; got bool labels (True/False would silently be read as "
                         "classes 1/0). Convert them to class indices, e.g. labels.long().")


def _refuse_missing_decoder_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if args or any(kwargs.get(key) is not None for key in ("labels", "decoder_input_ids", "decoder_inputs_embeds")):
        return
    raise ValueError(
        f"{type(module).__name__} got no decoder_input_ids: with compute_loss_func the Trainer runs the model without "
        "labels, so an encoder-decoder cannot build its decoder inputs itself. Add them in the collator "
        "(DataCollatorForSeq2Seq(tokenizer, model=model) does), or train with LABOSeq2SeqTrainer, which builds them."
    )


def _watch_decoder_inputs(model: nn.Module) -> Any:
    """For an encoder-decoder `model`, a forward pre-hook that says how to add decoder inputs when a batch has none
    (transformers' own error, "cannot specify both decoder_input_ids and decoder_inputs_embeds", names neither)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if not getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return None
    return base.register_forward_pre_hook(_refuse_missing_decoder_inputs, with_kwargs=True)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` (possibly PEFT-wrapped) is a decoder-only language model: its labels are shifted (position i
    predicts label i + 1). transformers marks most with ``loss_type="ForCausalLM"``; some (GPT-2) only by being in
    its causal-LM mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    return getattr(base, "loss_type", None) == "ForCausalLM" or (
        type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    )


def prepare_decoder_inputs(model: nn.Module, inputs: dict[str, Any], labels: Tensor | None) -> None:
    """Add ``decoder_input_ids`` built from `labels` to an encoder-decoder's `inputs` when they have none.

    Without labels the model cannot build its decoder inputs itself; this does what it would have done.
    """
    if (
        labels is None
        or not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        or inputs.get("decoder_input_ids") is not None
        or inputs.get("decoder_inputs_embeds") is not None
    ):
        return
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise ValueError(
            f"{type(model).__name__} has no prepare_decoder_input_ids_from_labels; provide decoder_input_ids in "
            "the batch (e.g. with DataCollatorForSeq2Seq(tokenizer, model=model))."
        )
    inputs["decoder_input_ids"] = prepare(labels=labels)


def model_logits(outputs: Any) -> Tensor:
    """The logits of a transformers model's outputs (a ModelOutput, a tuple without loss, or the logits)."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if outputs.get("logits") is None:
            raise ValueError("the model outputs have no 'logits'")
        return outputs["logits"]
    if isinstance(outputs, tuple | list):
        return outputs[0]
    raise ValueError(f"cannot find logits in outputs of type {type(outputs).__name__}")


def _shifts(outputs: Any) -> bool:
    """Whether labels need shifting for these outputs: transformers' causal LMs return ``CausalLM*Output*``."""
    name = type(outputs).__name__
    if name.startswith("CausalLMOutput"):
        return True
    if isinstance(outputs, Mapping) and name != "dict":
        return False
    raise ValueError(
        f"cannot tell from outputs of type {name} whether labels must be shifted; pass shift_labels=True "
        "(causal LM: position i predicts label i+1) or shift_labels=False"
    )


def _same_call(expected: tuple, given: tuple) -> bool:
    """Whether a loss call passes the very targets and count given to `expect` (the same objects, or equal
    numbers)."""
    return all(a is b or (not torch.is_tensor(a) and not torch.is_tensor(b) and a == b)
               for a, b in zip(expected, given, strict=True))


class _ThroughOutputs(torch.autograd.Function):
    """The fused loss, made to depend on the model's (last-position) logits with a zero gradient.

    Sharding engines hook the backward of a unit onto its outputs: an FSDP2 root wrapped with
    ``reshard_after_forward=True`` gathers its parameters (the final norm's, the embeddings') again only when a
    gradient reaches its outputs. A loss computed from the captured hidden states alone would bypass that hook,
    and the backward would read freed parameters.
    """

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor) -> Tensor:  # noqa: D102
        ctx.logits = (logits.shape, logits.dtype, logits.device)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        shape, dtype, device = ctx.logits
        return grad, torch.zeros(shape, dtype=dtype, device=device)


class LABOLossFunction:
    """A ``compute_loss_func`` for `transformers.Trainer`, `Seq2SeqTrainer` or trl's `SFTTrainer`; also built as
    `labo_loss_func(...)`.

    Args:
        regularizer, alpha, temperature, ignore_index: as `label_regularized_loss`.
        shift_labels: True for causal LMs (logits at i predict label i+1, as transformers' ``ForCausalLMLoss``),
            False for classification and encoder-decoder models, None to detect it from the output class
            (``CausalLMOutput*`` shifts).
        fused_linear: compute a causal LM's training loss from its final hidden states and lm_head weight without
            the (N, V) logits (`fused_linear_label_regularized_loss`). Needs ``model``; refuses models whose logits
            are not a plain linear map (softcapping, logit scaling, a transform before the lm_head). Evaluation
            still builds the logits.
            The loss is computed as a call of the lm_head module, so that sharding engines (FSDP2, DeepSpeed
            ZeRO-3) hand it the whole weight; after the model's forward by default, or inside it when the targets
            are given first with ``expect`` (as `LABOTrainer` and `apply_labo` do; needed when the lm_head is
            resharded with an FSDP2 root after the forward).
        model: the model the Trainer trains: needed for ``fused_linear``; for an encoder-decoder, a batch without
            decoder inputs is then refused saying how to add them (hooks are added, ``.remove()`` drops them).
        chunk_size: rows per chunk of the fused loss.
        hook_forward: for ``fused_linear``, arm the hidden-state capture from a forward pre-hook on ``model`` (False:
            the caller arms it, as `apply_labo`'s patched forward does).

    Calling it, ``(outputs, labels, num_items_in_batch=None) -> 0-dim loss``, divides the micro-batch's sum by
    ``num_items_in_batch`` (the Trainers' whole-batch count; they multiply the loss by the number of processes), so
    training is exact under gradient accumulation and DDP; without a count it divides by the local one.

    ``last_stats`` holds the `LossStats` of the latest call (sums, detached), for logging; ``last_fused`` says
    whether it came from the fused linear loss.
    """

    def __init__(
        self,
        regularizer: str = "labo",
        alpha: float | None = None,
        temperature: float | None = None,
        *,
        shift_labels: bool | None = None,
        fused_linear: bool = False,
        model: nn.Module | None = None,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        hook_forward: bool = True,
    ) -> None:
        self.config = LossConfig(regularizer, alpha, temperature, ignore_index)
        if shift_labels not in (None, True, False):
            raise ValueError(f"shift_labels must be None (detect), True or False, got {shift_labels!r}")
        if fused_linear and model is None:
            raise ValueError("fused_linear=True needs model=...: the loss reads its hidden states and lm_head weight")
        self.shift_labels = shift_labels
        self.chunk_size = chunk_size
        self.head = LinearHeadCapture(model, hook_forward=hook_forward) if fused_linear else None
        self._decoder_check = _watch_decoder_inputs(model) if model is not None and not fused_linear else None
        self.last_stats: LossStats | None = None
        self.last_fused = False
        self._expected: tuple = (None, None, None)  # the targets given to `expect`
        self._count_watch: list[int] | None = [0, -1, 0, 0]  # calls, count, unshifted sum, shifted sum

    @classmethod
    def from_config(cls, config: LossConfig, **kwargs: Any) -> LABOLossFunction:
        """Build one from validated loss settings; `kwargs` as the constructor's keyword arguments."""
        return cls(**config.loss_kwargs(), **kwargs)

    def __call__(self, outputs: Any, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """The loss of one micro-batch (see the module docstring for the reduction)."""
        loss, _ = self.loss_with_stats(outputs, labels, num_items_in_batch)
        return loss

    def targets(self, outputs: Any, labels: Tensor, shift_labels: Tensor | None = None) -> Tensor:
        """Labels aligned position by position with the logits; `shift_labels` are already aligned."""
        if shift_labels is not None:
            return shift_labels
        if self.shift_labels is not None:
            shift = self.shift_labels
        elif outputs is None and self.head is not None:
            shift = True  # the fused loss, before any outputs: fused_linear is for causal LMs only
        else:
            shift = _shifts(outputs)
        if shift:
            # Padding the (small) labels by one ignored position leaves the (large) logits unsliced.
            return nn.functional.pad(labels[..., 1:], (0, 1), value=self.config.ignore_index)
        return labels

    def loss_with_stats(
        self, outputs: Any, labels: Tensor | None, num_items_in_batch: Tensor | int | None = None,
        *, shift_labels: Tensor | None = None,
    ) -> tuple[Tensor, LossStats]:
        """The loss and its `LossStats`; `shift_labels` (pre-aligned, e.g. padding-free collators) wins."""
        if labels is None and shift_labels is None:
            raise ValueError("the LABO loss needs labels; the batch has none")
        check_class_labels(labels)
        logits = model_logits(outputs)
        targets = self.targets(outputs, labels, shift_labels).to(logits.device)
        if shift_labels is None and num_items_in_batch is not None and self._count_watch is not None:
            self._check_shifted_count(labels, targets, num_items_in_batch)
        hidden = self.head.take(logits) if self.head is not None else None
        if hidden is not None:
            result = self.head.result()
            if result is None:  # not computed inside the forward: the lm_head is called again now
                result = self._fused(hidden, targets, num_items_in_batch)
            elif not _same_call(self._expected, (labels, num_items_in_batch, shift_labels)):
                raise ValueError("the fused loss was computed inside the forward from the labels and "
                                 "num_items_in_batch given to expect(); call the loss with the same ones")
            loss, stats = result
            self.head.check(logits)
            loss = _ThroughOutputs.apply(loss, logits)
        else:
            loss, stats = label_regularized_loss_with_stats(
                logits, targets, num_items_in_batch=num_items_in_batch, **self.config.loss_kwargs()
            )
        self.last_stats, self.last_fused = stats, hidden is not None
        return loss, stats

    def expect(self, labels: Tensor | None, num_items_in_batch: Tensor | int | None = None,
               shift_labels: Tensor | None = None) -> None:
        """For ``fused_linear``: compute the loss of the next training forward inside it, from these targets.

        Inside the forward the lm_head weight is whole even when a sharding engine (FSDP2, DeepSpeed ZeRO-3)
        frees it after the forward; the following call of this object returns that loss. `LABOTrainer` and
        `apply_labo` call this before the model's forward; without it the loss calls the lm_head again after
        the forward, which needs the weight to be gathered then (true of a lm_head that is its own FSDP2 unit
        or under ZeRO-3, not of one resharded with the root FSDP2 unit).
        """
        if self.head is not None and (labels is not None or shift_labels is not None):
            self._expected = (labels, num_items_in_batch, shift_labels)
            targets = self.targets(None, labels, shift_labels)
            self.head.expect(lambda hidden: self._fused(hidden, targets, num_items_in_batch))

    def _fused(self, hidden: Tensor, targets: Tensor, num_items_in_batch: Tensor | int | None,
               ) -> tuple[Tensor, LossStats]:
        """The fused linear loss of `hidden` for the aligned `targets`, computed as a call of the lm_head (see
        `LinearHeadCapture.run`)."""
        targets = targets.to(hidden.device).reshape(-1)

        def compute(h: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, ...]:
            loss, stats = fused_linear_label_regularized_loss_with_stats(
                h.reshape(-1, h.shape[-1]), weight, targets, bias, num_items_in_batch=num_items_in_batch,
                chunk_size=self.chunk_size, **self.config.loss_kwargs(),
            )
            # Plain tensors out, so the engines' hooks see (and register backward hooks on) the loss.
            return (loss, *stats)

        loss, *stats = self.head.run(compute, hidden)
        return loss, LossStats(*stats)

    def _check_shifted_count(self, labels: Tensor, targets: Tensor, num_items_in_batch: Tensor | int) -> None:
        """Warn once when ``num_items_in_batch`` counted the unshifted labels of a shifted loss.

        transformers counts ``labels[..., 1:]`` only for ``loss_type="ForCausalLM"``; for GPT-2 (none) a plain
        Trainer counts every label, and the loss comes out too small by the first positions' share. Seen here when
        one process's micro-batches sum, unshifted, to the count (a count over several processes is not checked).
        """
        watch = self._count_watch
        ignore = self.config.ignore_index
        count = int(num_items_in_batch.reshape(-1)[0]) if isinstance(num_items_in_batch, Tensor) else int(num_items_in_batch)
        if count != watch[1]:
            watch[1:] = [count, 0, 0]
        watch[0] += 1
        watch[2] += int((labels != ignore).sum())
        watch[3] += int((targets != ignore).sum())
        if watch[2] == count != watch[3]:
            logger.warning(
                "num_items_in_batch (%d) counts the unshifted labels, but this causal-LM loss predicts labels[..., "
                "1:] only (%d positions), so the loss is too small: set model.loss_type = \"ForCausalLM\" before "
                "building the Trainer (GPT-2 has none), or use LABOTrainer or apply_labo.", count, watch[3])
            self._count_watch = None
        elif watch[0] >= _COUNT_CHECK_CALLS:
            self._count_watch = None

    def remove(self) -> None:
        """Remove the hooks put on ``model`` (``fused_linear``'s capture, the decoder-input check)."""
        if self.head is not None:
            self.head.remove()
            self.head = None
        if self._decoder_check is not None:
            self._decoder_check.remove()
            self._decoder_check = None


def labo_loss_func(
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    *,
    shift_labels: bool | None = None,
    fused_linear: bool = False,
    model: nn.Module | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    hook_forward: bool = True,
) -> LABOLossFunction:
    """The label-regularized loss for ``Trainer(compute_loss_func=labo_loss_func(...))``.

    For a plain `transformers.Trainer`, `Seq2SeqTrainer` or trl's `SFTTrainer`: the returned `LABOLossFunction`,
    called as ``(outputs, labels, num_items_in_batch=None)``, aligns the labels with the logits (shifted for causal
    LMs) and divides the micro-batch's sum over kept positions by ``num_items_in_batch``, so training is exact under
    gradient accumulation and DDP. The arguments are `LABOLossFunction`'s (LABO with alpha 0.1 and T 2 by default).

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator,
                          compute_loss_func=labo_loss_func(regularizer="labo", alpha=0.1, temperature=2.0))
    """
    return LABOLossFunction(
        regularizer, alpha, temperature, shift_labels=shift_labels, fused_linear=fused_linear, model=model,
        ignore_index=ignore_index, chunk_size=chunk_size, hook_forward=hook_forward,
    )
