"""Host side of the Triton kernels of ``triton_rows``: argument checks, input layout, launch configuration and the
launch itself. Nothing here is compiled; ``triton_rows`` holds the kernels and the two entry points.

Importing this module raises ImportError when triton is not installed.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from labo_hf.kernels import MODE_CROSS_ENTROPY, MODE_LABO, MODES

__all__ = ["SUPPORTED_DTYPES", "block_and_warps", "check_args", "device_supported", "launch", "launch_config",
           "prepare", "vector_width"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def device_supported(logits: Tensor, interpreted: bool) -> bool:
    """Whether the kernels can run on this tensor's device and dtype: CUDA, or CPU under the interpreter."""
    return logits.dtype in SUPPORTED_DTYPES and (logits.is_cuda or (interpreted and logits.device.type == "cpu"))


def launch_config(n_cols: int, kind: str) -> tuple[int, int]:
    """(BLOCK, num_warps) for one program per row of ``n_cols`` logits; ``kind`` is "forward" or "backward".

    NOT YET MEASURED ON A GPU: no GPU was available when this was written. The choice comes from
    sm_90 cubins compiled offline: the forward pass of LABO needs 64-68 registers per thread at 8
    elements per thread whatever the block, so small programs pack best (1024 columns / 4 warps:
    7-8 programs and 28-32 warps per SM) and waste least on a partial last block; the backward
    pass keeps no running state and takes 2048 columns / 8 warps. bench/gpu_check.py sweeps
    alternatives (--sweep) so that this table can be replaced by measured values.
    """
    cap = 1024 if kind == "forward" else 2048
    block = min(triton.next_power_of_2(max(n_cols, 1)), cap)
    return block, max(1, min(cap // 256, block // 256))


def block_and_warps(n_cols: int, kind: str, block_size: int | None) -> tuple[int, int]:
    """``launch_config``, or the default warps for an explicit ``block_size`` (tests and tuning)."""
    if block_size is not None:
        return block_size, max(1, min(16, block_size // 256))
    return launch_config(n_cols, kind)


def check_args(logits, labels, regularizer, alpha, temperature, block_size, *, interpreted: bool):
    """Validate the entry points' arguments; returns (mode, alpha, temperature) as the kernels take them."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor (N, K); got shape {tuple(getattr(logits, 'shape', ()))}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"logits dtype must be float32, float16, bfloat16 or float64; got {logits.dtype}")
    n_rows, n_cols = logits.shape
    if n_cols < 1:
        raise ValueError("logits must have at least one class (K >= 1)")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels must have shape ({n_rows},); got {tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    if regularizer not in MODES:
        raise ValueError(f"regularizer must be one of {tuple(MODES)}; got {regularizer!r}")
    mode = MODES[regularizer]
    alpha = float(alpha)
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"alpha must be in [0, 1); got {alpha}")
    if mode == MODE_CROSS_ENTROPY and alpha != 0.0:
        raise ValueError("alpha must be 0 for regularizer='cross_entropy'")
    temp = 1.0
    if mode == MODE_LABO:
        if temperature is None or not math.isfinite(float(temperature)) or float(temperature) <= 0.0:
            raise ValueError(f"temperature must be a finite positive number for 'labo'; got {temperature}")
        temp = float(temperature)
    if block_size is not None and (block_size < 1 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a positive power of two; got {block_size}")
    if not device_supported(logits, interpreted):
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got device {logits.device}); CPU tensors are only "
            "accepted when TRITON_INTERPRET=1 was set before triton was first imported"
        )
    return mode, alpha, temp


def prepare(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Detached logits with unit column stride (rows may stay strided) and contiguous int64 labels."""
    logits = logits.detach()
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits, labels.detach().to(torch.int64).contiguous()


def vector_width(dtype: torch.dtype) -> int:
    """Elements per 16-byte access."""
    return max(1, 16 // torch.empty((), dtype=dtype).element_size())


def launch(kernel, grid, args, meta, device, num_warps, *, interpreted: bool) -> None:
    if interpreted:
        kernel[grid](*args, **meta)
    else:
        with torch.cuda.device(device):
            # Explicit FMA contraction: today's default, pinned before Triton flips it.
            kernel[grid](*args, **meta, num_warps=num_warps, enable_fp_fusion=True)
