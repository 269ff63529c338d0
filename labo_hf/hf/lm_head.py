"""Reading a causal LM's final hidden states and lm_head, so the fused linear loss can skip its logits.

`LinearHeadCapture` hooks a transformers causal LM: while it trains (module in training mode, grad enabled, no
labels given to the forward), each forward gets ``logits_to_keep`` set to the last position only, so the lm_head builds (B, 1, V) logits instead of
(B, T, V), and the base model's last hidden state is kept for the loss. Elsewhere (evaluation, generation) the
model is untouched. The last-position logits let the first call check that the logits are a plain linear map of
the hidden states, which the fused loss assumes. transformers is only touched through the model passed in.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LinearHeadCapture", "check_plain_linear_head"]

# Config fields of transformers causal LMs whose logits are not hidden @ W.T (+ b).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": "final-logit softcapping",
    "logit_scale": "logit scaling",
    "logits_scaling": "logit scaling",
    "output_multiplier_scale": "logit scaling",
    "mup_width_multiplier": "muP logit scaling",
}


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DDP wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def check_plain_linear_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(base model, lm_head) of a causal LM whose logits are ``lm_head(base(...).last_hidden_state)``.

    Raises:
        ValueError: naming the reason when the model is not a decoder-only LM with a plain linear head.
    """
    model = _unwrap(model)
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"fused_linear needs a decoder-only causal LM; {name} is not one")
    sub_configs = [config] + [getattr(config, key) for key in ("text_config",) if hasattr(config, key)]
    for cfg in sub_configs:
        for field, reason in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, field, None)
            if value not in (None, 0, 1, 1.0, False):
                raise ValueError(
                    f"fused_linear cannot be used with {name}: its logits are not a plain linear map of the hidden "
                    f"states ({reason}: config.{field}={value!r}). Use the full-logits loss."
                )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"fused_linear (--labo_fused_linear) is for causal LMs; {name} has no language-model head "
                         "(e.g. an image or sequence classifier). Leave it off: the full-logits loss applies.")
    if type(head) is not nn.Linear:
        raise ValueError(
            f"fused_linear needs the output embeddings of {name} to be a plain nn.Linear, got "
            f"{type(head).__name__} (e.g. an adapter on the lm_head is a transform of the weight)"
        )
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"fused_linear cannot find the base model of {name} (no base_model_prefix)")
    if "logits_to_keep" not in inspect.signature(type(model).forward).parameters:
        raise ValueError(f"fused_linear needs {name}.forward to take logits_to_keep, which it does not")
    return base, head


class LinearHeadCapture:
    """Hooks that let a loss take a training forward's final hidden states instead of its logits.

    ``take(outputs)`` returns the (B, T, H) hidden states of the forward that produced `outputs`, or None when
    that forward was not a captured one (the loss then uses ``outputs.logits``). ``remove()`` undoes the hooks.
    """

    def __init__(self, model: nn.Module, *, hook_forward: bool = True) -> None:
        self._base, self.head = check_plain_linear_head(model)
        self._model = _unwrap(model)
        self._hidden: Tensor | None = None
        self._armed = False
        self._checked = False
        self._handles = [self._base.register_forward_hook(self._capture)]
        if hook_forward:
            # On the model as given: PEFT calls the inner model's .forward directly, bypassing its hooks.
            self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))

    def arm(self, training: bool, kwargs: dict) -> dict:
        """The forward's keyword arguments, with ``logits_to_keep=1`` when this forward is to be captured."""
        self._hidden = None
        # A forward given labels computes the model's own loss, which needs its full logits.
        self._armed = training and torch.is_grad_enabled() and kwargs.get("labels") is None
        # One position, not zero: its logits let the first call check the linear-map assumption.
        return {**kwargs, "logits_to_keep": 1} if self._armed else kwargs

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, self.arm(module.training, kwargs)

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed:
            self._hidden = output[0] if isinstance(output, tuple) else output["last_hidden_state"]
            self._armed = False

    def take(self, logits: Tensor) -> Tensor | None:
        """The captured hidden states for a forward whose logits are `logits`, once; None if not captured."""
        hidden, self._hidden = self._hidden, None
        if hidden is None or logits.shape[-2] != 1 or hidden.shape[:-2] != logits.shape[:-2]:
            return None
        if not self._checked:
            self._check(hidden[..., -1:, :], logits)
            self._checked = True
        return hidden

    @torch.no_grad()
    def _check(self, last_hidden: Tensor, logits: Tensor) -> None:
        expected = nn.functional.linear(last_hidden.float(), self.head.weight.float(),
                                        None if self.head.bias is None else self.head.bias.float())
        tolerance = 1e-3 if logits.dtype == torch.float32 else 5e-2
        error = float((expected - logits.float()).abs().max())
        scale = float(expected.abs().max()) + 1.0
        if not error <= tolerance * scale:
            raise ValueError(
                f"fused_linear cannot be used with {type(self._model).__name__}: its logits are not a plain linear "
                f"map of the base model's last hidden state (max difference {error:.3g}; e.g. softcapping, logit "
                "scaling or a transform before a tied lm_head). Use the full-logits loss."
            )

    def remove(self) -> None:
        """Remove the hooks; the model is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hidden = None
