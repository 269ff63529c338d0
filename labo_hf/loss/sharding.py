"""Refusing a sharded lm_head weight in the fused linear loss, with the way out.

Sharding engines keep a layer's weight whole only while that layer runs: FSDP2 (``fully_shard``) swaps in a
``DTensor`` shard after the forward, FSDP1 a 1-D slice of its flat parameter, DeepSpeed ZeRO-3 an empty
placeholder (``ds_status`` NOT_AVAILABLE, ``numel() == 0``, the real shape in ``ds_shape``). A loss that reads
the weight then gets a piece of it, and its matmul fails with a message about shapes or mixed tensor types.

Pure torch: DTensor comes from torch itself (guarded, for builds without distributed), ZeRO-3 placeholders are
recognized by their attributes, so neither FSDP nor DeepSpeed is imported here.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_whole_weight"]

_FIX = (
    "The fused loss needs the whole weight, which a sharding engine holds only while the lm_head runs: compute "
    "it inside the model's forward, as apply_labo(model, fused_linear=True), LABOTrainer --labo_fused_linear and "
    "labo_loss_func(fused_linear=True, model=model) do; or gather the weight before the call (FSDP2: the "
    "lm_head's FSDPModule.unshard(); DeepSpeed ZeRO-3: deepspeed.zero.GatheredParameters); or use LABOLoss on "
    "the logits."
)


def _sharding(weight: Tensor) -> str | None:
    """What kind of shard `weight` is, or None when it looks whole."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        DTensor = None  # noqa: N806
    if DTensor is not None and isinstance(weight, DTensor):
        return f"a DTensor (placements {tuple(weight.placements)}, local shard {tuple(weight.to_local().shape)})"
    status = getattr(weight, "ds_status", None)
    if status is not None:
        ds_shape = tuple(getattr(weight, "ds_shape", ()))
        if "NOT_AVAILABLE" in str(status) or tuple(weight.shape) != ds_shape:
            return (f"a DeepSpeed ZeRO-3 placeholder (ds_status {getattr(status, 'name', status)}, shape "
                    f"{tuple(weight.shape)}, full shape {ds_shape})")
    if weight.dim() == 1:
        return f"a 1-D tensor of {weight.numel()} elements (e.g. an FSDP flat-parameter shard)"
    if weight.numel() == 0:
        return f"an empty tensor of shape {tuple(weight.shape)} (e.g. a freed sharded parameter)"
    return None


def check_whole_weight(weight: object, name: str = "weight", fix: str = _FIX) -> None:
    """Raise a ValueError naming what was received, and `fix`, when `weight` is a shard of a sharded parameter."""
    if not isinstance(weight, Tensor):
        return  # the caller's own type check reports it
    kind = _sharding(weight)
    if kind is not None:
        raise ValueError(f"{name} is {kind}, not a whole (V, H) matrix. {fix}")
