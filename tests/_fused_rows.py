"""Forward then backward of one kernel implementation in one call, for the kernel tests: a helper over the public
``forward_rows`` / ``backward_rows`` of ``labo_hf.kernels.torch_rows`` or ``labo_hf.kernels.triton_rows``."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class FusedRows(NamedTuple):
    loss: Tensor
    """(N,): H(q, p) per row; 0 for ignored rows."""
    nll: Tensor
    """(N,): -log p_y per row; 0 for ignored rows."""
    smoothing_entropy: Tensor
    """(N,): H(u) per row; 0 for ignored rows."""
    grad: Tensor | None
    """(N, K) in the logits' dtype: grad_scale * (p - q); None when no gradient was asked for."""


def fused_rows(kernels, logits: Tensor, labels: Tensor, *, grad_scale: float | Tensor, want_grad: bool = True,
               **config) -> FusedRows:
    """``kernels.forward_rows(logits, labels, **config)`` then, if ``want_grad``, ``kernels.backward_rows`` with
    ``grad_scale`` (a float or a one-element tensor, read on the device) for every row."""
    stats = kernels.forward_rows(logits, labels, **config)
    grad = None
    if want_grad:
        if isinstance(grad_scale, Tensor) and (grad_scale.numel() != 1 or not grad_scale.dtype.is_floating_point):
            raise ValueError("grad_scale tensor must be a single floating-point value")
        scale = torch.as_tensor(grad_scale, dtype=stats.loss.dtype, device=logits.device).reshape(())
        grad = kernels.backward_rows(scale.expand(logits.shape[0]), logits, labels, stats, **config)
    return FusedRows(stats.loss, stats.nll, stats.smoothing_entropy, grad)
