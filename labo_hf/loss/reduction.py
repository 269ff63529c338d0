"""The one reducer: the sum over kept positions divided by ``num_items_in_batch`` when given, else by the
local kept count. Every loss (LABO, LS, CE; logits or fused linear) scales its sum by ``reduction_scale``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from labo_hf.loss.validation import check_count


def reduction_scale(num_items_in_batch: int | float | Tensor | None, kept: Tensor, dtype: torch.dtype,
                     validate: bool) -> tuple[Tensor | float, Tensor | float]:
    """1 / the reduction's denominator and a poison term (0, or NaN for an invalid tensor count).

    An all-ignored batch keeps a finite scale (its sum is 0). Python numbers are always checked
    eagerly; a tensor count only when ``validate`` (a host sync), else on device.
    """
    if num_items_in_batch is None:
        return 1.0 / kept.sum().clamp(min=1).to(dtype), 0.0
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a single count, got shape {tuple(num_items_in_batch.shape)}"
            )
        if num_items_in_batch.is_complex() or num_items_in_batch.dtype == torch.bool:
            raise ValueError(f"num_items_in_batch must be a real count, got dtype {num_items_in_batch.dtype}")
        count = num_items_in_batch.detach().reshape(()).to(kept.device, dtype)
        if validate:
            check_count(count.item(), kept)
        has_kept = kept.any()
        valid = torch.isfinite(count) & ((count > 0) | ((count == 0) & ~has_kept))
        scale = torch.where(count > 0, 1.0 / count.clamp(min=torch.finfo(dtype).tiny), 1.0)
        return torch.where(valid, scale, math.nan), torch.where(valid, 0.0, math.nan)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int | float):
        raise ValueError(f"num_items_in_batch must be a number or a tensor, got {num_items_in_batch!r}")
    check_count(num_items_in_batch, kept if validate else None)
    if num_items_in_batch == 0:
        # Without validation, kept positions with a zero count poison the call on device.
        return 1.0, torch.where(kept.any(), math.nan, 0.0).to(dtype)
    return 1.0 / num_items_in_batch, 0.0

