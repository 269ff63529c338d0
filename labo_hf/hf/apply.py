"""`apply_labo`: make a transformers model's own loss (``model(**batch, labels=...).loss``) the LABO loss.

Served: every head whose loss is one class label per position or per example -- causal LM, masked LM,
sequence/image/audio/video classification, token classification, encoder-decoder LM. The family comes from the
model itself: transformers names each head's loss (``model.loss_type``, a key of
``transformers.loss.loss_utils.LOSS_MAPPING``, derived from the class name). Refused by name: question answering
(two span logits), regression and multi-label classification (no class label to smooth), and every other loss
(CTC, detection, segmentation, ...).

Models whose forward computes its loss through ``self.loss_function`` (GPT-2, Llama, BERT's masked LM, ViT, ...)
get an instance-level ``loss_function``: the call is bound to the signature of the transformers loss it replaces,
so its arguments are read by name whatever order the model passes them in (ViT passes ``(labels, logits,
config)``, causal LMs ``(logits, labels, vocab_size)``), and a ``forward`` that hands the loss the
``num_items_in_batch`` it receives (transformers' generic sequence and token classifiers call their loss without
it, so their built-in loss ignores it). The others (Marian, T5, BERT's classification heads, which
call ``CrossEntropyLoss`` themselves), and every model with ``fused_linear=True``, get an instance-level
``forward`` that runs the original forward without labels and computes the loss from its logits. Either way
``num_items_in_batch`` reaches the loss (the Trainer passes it to a forward that takes ``**kwargs``), the class,
config and weights are untouched, so ``save_pretrained`` writes a plain model, and `remove_labo` restores the
previous behaviour.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

from torch import Tensor, nn

from labo_hf.hf.model_loss import LABOLossFunction, check_class_labels, is_causal_lm, prepare_decoder_inputs

__all__ = ["LABOHandle", "apply_labo", "remove_labo"]

_ATTRIBUTE = "_labo_handle"
_MISSING = object()

# transformers' loss functions LABO replaces -> (name of the logits argument, whether labels are shifted).
_SERVED_LOSSES = {
    "ForCausalLMLoss": ("logits", True),
    "ForMaskedLMLoss": ("logits", False),
    "ForSequenceClassificationLoss": ("pooled_logits", False),
    "ForTokenClassification": ("logits", False),
}
_CLASSIFICATION_LOSS = "ForSequenceClassificationLoss"
_REFUSED = {
    "ForQuestionAnswering": "question answering: the loss is over two span logits (start, end), not one class label",
}


class LABOHandle(NamedTuple):
    """What `apply_labo` changed on a model; ``remove()`` undoes it."""

    model: nn.Module
    loss_fn: LABOLossFunction
    patched: str
    """``"loss_function"`` (with a ``forward`` passing ``num_items_in_batch`` on) or ``"forward"``."""
    previous: Any
    previous_forward: Any = _MISSING

    def remove(self) -> None:
        """Restore the model's own loss."""
        remove_labo(self.model)


def _uses_loss_function(model: nn.Module) -> bool:
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    return "self.loss_function(" in source


def _builtin_loss(model: nn.Module) -> Any | None:
    """The transformers loss function named by the model's ``loss_type`` (None when it names none)."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    return LOSS_MAPPING.get(getattr(model, "loss_type", None) or "")


def _refuse_unserved(model: nn.Module, builtin: Any | None) -> None:
    """Refuse, by name, a head whose loss is not one class label per position or per example."""
    name, loss_type = type(model).__name__, getattr(model, "loss_type", None)
    if loss_type in _REFUSED:
        raise ValueError(f"apply_labo cannot serve {name}: {_REFUSED[loss_type]}")
    if builtin is not None and builtin.__name__ not in _SERVED_LOSSES:
        raise ValueError(
            f"apply_labo cannot serve {name}: its loss is transformers' {builtin.__name__} (loss_type "
            f"{loss_type!r}), not a cross-entropy over one class label per position or per example"
        )
    if builtin is not None and builtin.__name__ == _CLASSIFICATION_LOSS:
        config = model.config
        if config.problem_type == "regression" or (config.problem_type is None and config.num_labels == 1):
            raise ValueError(f"apply_labo cannot serve {name} as a regression head (num_labels=1 or "
                             "problem_type='regression'): there is no class label to smooth")
        if config.problem_type == "multi_label_classification":
            raise ValueError(f"apply_labo cannot serve {name} for multi-label classification "
                             "(problem_type='multi_label_classification'): LABO smooths one class label per example")


def apply_labo(
    model: nn.Module,
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    *,
    fused_linear: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> LABOHandle:
    """Make ``model(**batch, labels=labels)`` return the label-regularized loss (LABO by default).

    Args:
        model: a transformers model with a ``labels`` argument: causal LM, masked LM, sequence, image, audio or
            video classification (single-label), token classification, encoder-decoder LM. Question answering,
            regression, multi-label classification and other losses (CTC, detection, ...) are refused.
        regularizer, alpha, temperature, ignore_index: as `label_regularized_loss`.
        fused_linear: causal LMs only; the training loss (module in training mode, grad enabled) comes from the
            final hidden states and the lm_head weight without building the (N, V) logits, and ``outputs.logits``
            is then None. Refused for models whose logits are not a plain linear map.
        chunk_size: rows per chunk of the fused loss.

    Returns:
        A `LABOHandle`; ``handle.remove()`` or ``remove_labo(model)`` restores the model's own loss.
        ``num_items_in_batch=`` passed to the forward (the Trainer does) is the reduction's denominator.
    """
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise ValueError("apply_labo was already applied to this model; call remove_labo(model) first")
    if isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "get_base_model"):
        raise ValueError("apply_labo needs the transformers model itself, not a DDP or PEFT wrapper: apply it first")
    causal = is_causal_lm(model)
    builtin = _builtin_loss(model)
    _refuse_unserved(model, builtin)
    via_loss_function = not fused_linear and _uses_loss_function(model)
    if via_loss_function and builtin is None:
        # transformers' own fallback for a model whose loss_type names no loss (GPT-2): the causal-LM loss.
        from transformers.loss.loss_utils import ForCausalLMLoss as builtin
    shift = _SERVED_LOSSES[builtin.__name__][1] if via_loss_function else causal
    loss_fn = LABOLossFunction(
        regularizer, alpha, temperature, shift_labels=shift, fused_linear=fused_linear,
        model=model if fused_linear else None, ignore_index=ignore_index, chunk_size=chunk_size,
        hook_forward=False,  # the patched forward arms the capture itself, after taking the labels out
    )
    if via_loss_function:
        previous = model.__dict__.get("_loss_function", _MISSING)
        previous_forward = model.__dict__.get("forward", _MISSING)
        # Some heads (transformers' generic sequence and token classifiers) call their loss without the forward's
        # **kwargs: the count the forward received is handed to the loss through `count`.
        count: dict[str, Any] = {"num_items_in_batch": None}
        model.loss_function = functools.partial(_loss_function, loss_fn, builtin, count)
        original = model.forward
        model.forward = functools.wraps(original)(functools.partial(_counting_forward, original, count))
        handle = LABOHandle(model, loss_fn, "loss_function", previous, previous_forward)
    else:
        previous = model.__dict__.get("forward", _MISSING)
        original = model.forward
        model.forward = functools.wraps(original)(functools.partial(_forward, model, original, loss_fn))
        handle = LABOHandle(model, loss_fn, "forward", previous)
    if causal and getattr(model, "loss_type", None) is None:
        # The Trainer counts num_items_in_batch over labels[..., 1:] only for loss_type "ForCausalLM"; GPT-2 has
        # none, so its count would include the first position, which the shifted loss never predicts.
        model.__dict__["_labo_unset_loss_type"] = True
        model.loss_type = "ForCausalLM"
    setattr(model, _ATTRIBUTE, handle)
    return handle


def remove_labo(model: nn.Module) -> None:
    """Undo `apply_labo` (does nothing if it was not applied)."""
    handle = model.__dict__.pop(_ATTRIBUTE, None)
    if handle is None:
        return
    handle.loss_fn.remove()
    if model.__dict__.pop("_labo_unset_loss_type", False):
        model.loss_type = None
    if handle.patched == "loss_function":
        if handle.previous is _MISSING:
            model.__dict__.pop("_loss_function", None)
        else:
            model._loss_function = handle.previous
    previous_forward = handle.previous_forward if handle.patched == "loss_function" else handle.previous
    if previous_forward is _MISSING:
        model.__dict__.pop("forward", None)
    else:
        model.forward = previous_forward


def _counting_forward(original: Any, count: dict[str, Any], *args: Any,
                      num_items_in_batch: Tensor | int | None = None, **kwargs: Any) -> Any:
    """The model's forward, keeping the ``num_items_in_batch`` it was given for the loss function."""
    if num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch
    count["num_items_in_batch"] = num_items_in_batch
    try:
        return original(*args, **kwargs)
    finally:
        count["num_items_in_batch"] = None


def _loss_function(loss_fn: LABOLossFunction, builtin: Any, count: dict[str, Any], *args: Any,
                   **kwargs: Any) -> Tensor:
    """Stands in for transformers' `builtin` loss: the model's call is bound to its signature, so the logits and
    labels are found by name whatever order the model passes them in."""
    signature = inspect.signature(builtin)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(parameter.name, {}))
    logits, labels = arguments[_SERVED_LOSSES[builtin.__name__][0]], arguments["labels"]
    ignore_index = arguments.get("ignore_index", loss_fn.config.ignore_index)
    if ignore_index != loss_fn.config.ignore_index:
        raise ValueError(f"the model passed ignore_index={ignore_index}, but apply_labo was given "
                         f"{loss_fn.config.ignore_index}")
    if builtin.__name__ == _CLASSIFICATION_LOSS:
        logits = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
    labels = labels.to(logits.device)
    num_items_in_batch = arguments.get("num_items_in_batch")
    if num_items_in_batch is None:
        num_items_in_batch = count["num_items_in_batch"]
    loss, _ = loss_fn.loss_with_stats(logits, labels, num_items_in_batch, shift_labels=arguments.get("shift_labels"))
    return loss


def _forward(model: nn.Module, original: Any, loss_fn: LABOLossFunction, *args: Any,
             labels: Tensor | None = None, num_items_in_batch: Tensor | int | None = None,
             shift_labels: Tensor | None = None, **kwargs: Any) -> Any:
    if labels is None and shift_labels is None:
        return original(*args, **kwargs)
    check_class_labels(labels)
    prepare_decoder_inputs(model, kwargs, labels)
    if loss_fn.head is not None:
        # The fused loss runs inside the forward, where a sharded lm_head weight is whole.
        loss_fn.expect(labels, num_items_in_batch, shift_labels)
        kwargs = loss_fn.head.arm(model.training, kwargs)
    outputs = original(*args, **kwargs)
    loss, _ = loss_fn.loss_with_stats(outputs, labels, num_items_in_batch, shift_labels=shift_labels)
    if isinstance(outputs, tuple):
        return (loss, *outputs)
    if loss_fn.last_fused:
        # The fused loss ran: the one-position logits it checked are not the model's logits.
        outputs["logits"] = None
    outputs["loss"] = loss
    return outputs
