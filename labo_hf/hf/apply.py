"""`apply_labo`: make a transformers model's own loss (``model(**batch, labels=...).loss``) the LABO loss.

Models whose forward computes its loss through ``self.loss_function`` (transformers' ``LOSS_MAPPING`` mechanism:
GPT-2, Llama and most causal LMs) get an instance-level ``loss_function``. The others (e.g. Marian and T5, which
call ``CrossEntropyLoss`` themselves), and every model with ``fused_linear=True``, get an instance-level
``forward`` that runs the original forward without labels and computes the loss from its outputs. Either way
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


class LABOHandle(NamedTuple):
    """What `apply_labo` changed on a model; ``remove()`` undoes it."""

    model: nn.Module
    loss_fn: LABOLossFunction
    patched: str
    """``"loss_function"`` or ``"forward"``."""
    previous: Any

    def remove(self) -> None:
        """Restore the model's own loss."""
        remove_labo(self.model)


def _uses_loss_function(model: nn.Module) -> bool:
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    return "self.loss_function(" in source


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
        model: a transformers model with a ``labels`` argument (classification, causal LM, encoder-decoder).
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
    loss_fn = LABOLossFunction(
        regularizer, alpha, temperature, shift_labels=causal, fused_linear=fused_linear,
        model=model if fused_linear else None, ignore_index=ignore_index, chunk_size=chunk_size,
        hook_forward=False,  # the patched forward arms the capture itself, after taking the labels out
    )
    if not fused_linear and _uses_loss_function(model):
        previous = model.__dict__.get("_loss_function", _MISSING)
        model.loss_function = functools.partial(_loss_function, loss_fn)
        handle = LABOHandle(model, loss_fn, "loss_function", previous)
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
    elif handle.previous is _MISSING:
        model.__dict__.pop("forward", None)
    else:
        model.forward = handle.previous


def _loss_function(
    loss_fn: LABOLossFunction, logits: Tensor, labels: Tensor, vocab_size: int | None = None,
    num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100, shift_labels: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` signature, computing the LABO loss."""
    if ignore_index != loss_fn.config.ignore_index:
        raise ValueError(f"the model passed ignore_index={ignore_index}, but apply_labo was given "
                         f"{loss_fn.config.ignore_index}")
    labels = labels.to(logits.device)
    loss, _ = loss_fn.loss_with_stats(logits, labels, num_items_in_batch, shift_labels=shift_labels)
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
