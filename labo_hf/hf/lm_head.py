"""Reading a causal LM's final hidden states and lm_head, so the fused linear loss can skip its logits.

`LinearHeadCapture` hooks a transformers causal LM: while it trains (module in training mode, grad enabled, no
labels given to the forward), each forward gets ``logits_to_keep`` set to the last position only, so the lm_head
builds (B, 1, V) logits instead of (B, T, V), and the base model's last hidden state is kept for the loss.
Elsewhere (evaluation, generation) the model is untouched. The last-position logits let the first call check that
the logits are a plain linear map of the hidden states, which the fused loss assumes.

The loss itself runs as a call of the lm_head module (`LinearHeadCapture.run`), because sharding engines make a
layer's weight whole only inside its own call: FSDP2 unshards a ``fully_shard``-ed lm_head in its forward
pre-hook and reshards it after; DeepSpeed ZeRO-3 gathers it and frees it again. When the targets are known before
the forward (``expect``: `LABOTrainer`, `apply_labo`), that call happens inside the model's forward, right after
the base model, where a root FSDP unit is still unsharded too. transformers is only touched through the model
passed in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from labo_hf.loss.sharding import check_whole_weight

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
    # A subclass that keeps Linear's forward is still a plain linear map (FSDP2 swaps in one, FSDPLinear).
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
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


# The lm_head's own call does not gather a weight that its engine shards with a parent unit (an FSDP2 root wrapped
# with reshard_after_forward=True) once that unit's forward has ended.
_RESHARDED_FIX = (
    "The fused loss ran after the forward, when the FSDP unit holding the lm_head (e.g. the root, wrapped with "
    "reshard_after_forward=True) had resharded it. Let it run inside the forward: use "
    "apply_labo(model, fused_linear=True) or LABOTrainer --labo_fused_linear, or call "
    "loss_fn.expect(labels, num_items_in_batch) before model(...); or make the lm_head its own FSDP unit "
    "(fully_shard(model.lm_head) before the root)."
)


class LinearHeadCapture:
    """Hooks that let a loss take a training forward's final hidden states instead of its logits.

    ``take(logits)`` returns the (B, T, H) hidden states of the forward that produced `logits`, or None when
    that forward was not a captured one (the loss then uses the logits); ``result()`` then returns what the
    computation given to ``expect`` returned if it already ran inside that forward. ``run`` calls a computation as
    the lm_head's forward. ``remove()`` undoes the hooks.
    """

    def __init__(self, model: nn.Module, *, hook_forward: bool = True) -> None:
        self._base, self.head = check_plain_linear_head(model)
        self._model = _unwrap(model)
        self._hidden: Tensor | None = None
        self._result: Any = None
        self._taken_result: Any = None
        self._pending: Callable[[Tensor], Any] | None = None
        self._compute: Callable[[Tensor], Any] | None = None
        self._expected_logits: Tensor | None = None
        self._armed = False
        self._checked = False
        self._handles = [self._base.register_forward_hook(self._capture)]
        if hook_forward:
            # On the model as given: PEFT calls the inner model's .forward directly, bypassing its hooks.
            self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))

    def expect(self, compute: Callable[[Tensor], Any] | None) -> None:
        """Run ``compute(hidden)`` inside the next forward, if it is a captured one (else it is dropped)."""
        self._pending = compute

    def arm(self, training: bool, kwargs: dict) -> dict:
        """The forward's keyword arguments, with ``logits_to_keep=1`` when this forward is to be captured."""
        self._hidden, self._result, self._expected_logits = None, None, None
        # A forward given labels computes the model's own loss, which needs its full logits.
        self._armed = training and torch.is_grad_enabled() and kwargs.get("labels") is None
        self._compute, self._pending = (self._pending if self._armed else None), None
        # One position, not zero: its logits let the first call check the linear-map assumption.
        return {**kwargs, "logits_to_keep": 1} if self._armed else kwargs

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, self.arm(module.training, kwargs)

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed:
            self._hidden = output[0] if isinstance(output, tuple) else output["last_hidden_state"]
            self._armed = False
            compute, self._compute = self._compute, None
            if compute is not None:
                self._result = compute(self._hidden)

    def take(self, logits: Tensor) -> Tensor | None:
        """The captured hidden states for a forward whose logits are `logits`, once; None if not captured."""
        hidden, self._hidden = self._hidden, None
        self._taken_result, self._result = self._result, None
        if hidden is None or logits.shape[-2] != 1 or hidden.shape[:-2] != logits.shape[:-2]:
            self._taken_result = None
            return None
        return hidden

    def result(self) -> Any:
        """What the computation given to ``expect`` returned inside the forward last taken, once; None if it did
        not run there."""
        result, self._taken_result = self._taken_result, None
        return result

    def check(self, logits: Tensor) -> None:
        """On the first call after `run`: refuse a model whose (last-position) `logits` are not the lm_head's
        linear map of the hidden states it was given."""
        expected, self._expected_logits = self._expected_logits, None
        if self._checked or expected is None:
            return
        tolerance = 1e-3 if logits.dtype == torch.float32 else 5e-2
        error = float((expected - logits.detach().float()).abs().max())
        scale = float(expected.abs().max()) + 1.0
        if not error <= tolerance * scale:
            raise ValueError(
                f"fused_linear cannot be used with {type(self._model).__name__}: its logits are not a plain linear "
                f"map of the base model's last hidden state (max difference {error:.3g}; e.g. softcapping, logit "
                "scaling or a transform before a tied lm_head). Use the full-logits loss."
            )
        self._checked = True

    def run(self, compute: Callable[[Tensor, Tensor, Tensor | None], Any], hidden: Tensor) -> Any:
        """``compute(hidden, weight, bias)`` run as the lm_head's forward, so that the weight is whole.

        The engine's hooks on the lm_head (FSDP2 unshard/reshard, ZeRO-3 gather/release, the backward ones
        registered on the call's inputs and outputs) wrap it as they wrap the layer's own forward; `hidden` is
        the call's input, cast as the engine casts the layer's inputs.
        """
        head = self.head
        previous = head.__dict__.get("forward")

        def forward(h: Tensor) -> Any:
            weight, bias = head.weight, head.bias
            check_whole_weight(weight, "the lm_head weight", _RESHARDED_FIX)
            h = h.to(weight.dtype)  # under autocast the final norm may return another dtype
            if not self._checked:
                with torch.no_grad():  # the last position's logits, for `check`
                    self._expected_logits = nn.functional.linear(
                        h[..., -1:, :].float(), weight.float(), None if bias is None else bias.float())
            return compute(h, weight, bias)

        head.forward = forward
        try:
            return head(hidden)
        finally:
            if previous is None:
                del head.forward
            else:
                head.forward = previous

    def remove(self) -> None:
        """Remove the hooks; the model is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hidden, self._result, self._taken_result, self._pending, self._compute = None, None, None, None, None
