"""Fused Triton kernel: label-regularized loss and its logits gradient in one launch.

For each row (one prediction position) of a 2-D logits matrix the kernel computes the
per-row loss H(q, p), the plain negative log-likelihood -log p_y, the entropy of the
smoothing distribution H(u), and the gradient ``grad_scale * (p - q)`` written directly in
the logits dtype, where p = softmax(z) and

    q = (1 - alpha) e_y + alpha u
    u = uniform over all K classes                       (regularizer="label_smoothing")
    u*_k = softmax_{k != y}(z_k / T), u*_y = 0           (regularizer="labo")
    no u, alpha = 0                                      (regularizer="cross_entropy")

(see docs/labo-method.md). Each program owns one row and streams it twice:

* pass 1 reads the row once and keeps per-lane online statistics (a BLOCK-wide vector of
  running maxima / rescaled sums, merged at the end, one exp per element and statistic so
  that the SFU keeps up with HBM): max and sum of exp for temperature 1;
  for LABO the max over non-target logits, the sum of exp((z - m) / T) and the running
  sum of exp(d) * d with d = (z - m) / T (everything needed for H(u*) and <u*, z> without
  cancellation); for label smoothing the sum of (z - z_y).
* pass 2 re-reads the row (typically from L2) and writes the gradient into a new buffer.

Ignored rows (label == ignore_index) skip pass 1, get zero statistics and a zero gradient
row. Labels outside [0, K) that are not ignore_index cannot raise inside a kernel without a
host synchronisation, so those rows get NaN loss and NaN gradient (loud, never a silent
out-of-bounds read).

Importing this module raises ImportError when triton is not installed; callers that
dispatch opportunistically should catch it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

# losses.py imports this module lazily (inside its dispatch), so this import is not circular.
from labo_hf.losses import FusedRows

__all__ = ["INTERPRETED", "supports", "triton_fused_rows"]

_MODES = {"cross_entropy": 0, "label_smoothing": 1, "labo": 2}
# float64 is accepted for completeness (computed in float32 like the others, grad stored in float64).
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Largest block one program streams at a time, with 8 elements per thread (one 16-byte load
# for bf16/fp16). Chosen from sm_90 cubins compiled offline (no GPU measurement yet): LABO
# needs 64-68 registers/thread at 8 elements/thread whatever the block, so small programs
# pack best (1024/4 warps: 7-8 programs, 28-32 warps per SM, fp32 included, where 4096/16
# warps fits one program) and waste the least on a partial last block (V=58101: 0.5%).
# Tunable per call with block_size / num_warps.
_MAX_BLOCK = 1024


@triton.jit
def _fused_rows_kernel(
    logits_ptr,
    labels_ptr,
    grad_ptr,
    loss_ptr,
    nll_ptr,
    entropy_ptr,
    scale_ptr,
    scale_value,
    n_cols,
    stride_logits,
    stride_grad,
    alpha,
    temperature,
    inv_temperature,
    log_n_cols,
    ignore_index,
    MODE: tl.constexpr,
    SCALE_IS_PTR: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row. int64 row offsets: N * K exceeds 2**31 for long sequences with
    # 256k vocabularies.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    row_logits = logits_ptr + row * stride_logits
    row_grad = grad_ptr + row * stride_grad
    offs = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    if label == ignore_index:
        # Padding costs one write of zeros and no read of its logits.
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                tl.store(row_grad + cols, zeros, mask=cols < n_cols)
        tl.store(loss_ptr + row, 0.0)
        tl.store(nll_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
    else:
        valid = (label >= 0) & (label < n_cols)
        # NaN poison for an out-of-range label: added to the scale and the statistics.
        poison = tl.where(valid, 0.0, float("nan"))
        safe_label = tl.where(valid, label, 0)
        z_y = tl.load(row_logits + safe_label).to(tl.float32)

        # ---- pass 1: per-lane online statistics -------------------------------------
        m1 = tl.full([BLOCK], neg_inf, tl.float32)  # running max of z
        s1 = tl.zeros([BLOCK], tl.float32)  # sum exp(z - m1)
        mt = tl.full([BLOCK], neg_inf, tl.float32)  # LABO: running max of non-target z
        st = tl.zeros([BLOCK], tl.float32)  # LABO: sum exp((z - mt) / T)
        wt = tl.zeros([BLOCK], tl.float32)  # LABO: sum exp(d) * d, d = (z - mt) / T
        sz = tl.zeros([BLOCK], tl.float32)  # LS: sum (z - z_y)
        # z_y as the LS shift keeps sum(z) small for large logits; 0 if z_y is -inf.
        ls_shift = tl.where(z_y == neg_inf, 0.0, z_y)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            in_row = cols < n_cols
            z = tl.load(row_logits + cols, mask=in_row, other=neg_inf).to(tl.float32)
            # One exp per element and statistic: exp(-|z - m|) is both the rescale factor of
            # the running sum when z is a new lane maximum and the new term otherwise. (The
            # usual exp(m_old - m_new) plus exp(z - m_new) costs two, and the SFU, not memory,
            # would then bound LABO's pass.) -inf entries contribute nothing and must not turn
            # (-inf) - (-inf) into NaN, even in lanes a where() discards.
            up = z > m1
            ref = tl.where(z == neg_inf, 0.0, m1)  # finite stand-in: -inf - ref stays -inf
            gap = tl.where(up, ref - z, z - ref)
            e = tl.exp(gap)
            s1 = tl.where(up, s1 * e + 1.0, s1 + e)
            m1 = tl.where(up, z, m1)
            if MODE == 2:
                # Same update at temperature T over the non-target classes, plus
                # wt = sum e^d * d (d = (z - mt) / T), rebased when the lane maximum moves:
                # every earlier d shifts by (mt_old - mt_new) / T = gap_t.
                zt = tl.where(in_row & (cols != label), z, neg_inf)
                up_t = zt > mt
                ref_t = tl.where(zt == neg_inf, 0.0, mt)
                gap_t = tl.where(up_t, ref_t - zt, zt - ref_t) * inv_temperature
                e_t = tl.exp(gap_t)
                gap_t0 = tl.where(gap_t == neg_inf, 0.0, gap_t)  # e_t = 0 there: avoid 0 * -inf
                wt = tl.where(up_t, e_t * (wt + st * gap_t0), wt + e_t * gap_t0)
                st = tl.where(up_t, st * e_t + 1.0, st + e_t)
                mt = tl.where(up_t, zt, mt)
            if MODE == 1:
                sz += tl.where(in_row, z - ls_shift, 0.0)

        # Merge the lanes.
        big_m = tl.max(m1, axis=0)
        big_m_safe = tl.where(big_m == neg_inf, 0.0, big_m)
        big_s = tl.sum(s1 * tl.exp(m1 - big_m_safe), axis=0)
        log_s = tl.log(big_s)
        nll = (big_m - z_y) + log_s + poison
        scale = scale_value
        if SCALE_IS_PTR:
            scale = tl.load(scale_ptr).to(tl.float32)
        scale = scale + poison
        inv_s = 1.0 / big_s

        a_eff = alpha
        big_mt_safe = 0.0
        big_st_safe = 1.0
        if MODE == 0:
            loss = nll
            entropy = 0.0 + poison
        elif MODE == 1:
            # loss = lse - (1-a) z_y - a mean(z) = nll - a * mean(z - z_y)
            mean_shifted = tl.sum(sz, axis=0) / n_cols
            loss = tl.where(z_y == neg_inf, float("inf"), nll - alpha * mean_shifted)
            entropy = log_n_cols + poison
        else:
            big_mt = tl.max(mt, axis=0)
            big_mt_safe = tl.where(big_mt == neg_inf, 0.0, big_mt)
            lane_ratio = tl.exp((mt - big_mt_safe) * inv_temperature)
            lane_rebase = tl.where(mt == neg_inf, 0.0, (mt - big_mt_safe) * inv_temperature)
            big_st = tl.sum(st * lane_ratio, axis=0)
            big_wt = tl.sum(lane_ratio * (wt + st * lane_rebase), axis=0)
            # Degenerate row (every non-target logit -inf, or K == 1): the smoothing mass
            # has nowhere to go, so q = e_y and H(u*) = 0.
            has_mass = big_st > 0.0
            big_st_safe = tl.where(has_mass, big_st, 1.0)
            mean_d = big_wt / big_st_safe  # <u*, (z - max_nt z) / T>, <= 0
            # H(u*) = log S_T - <u*, d>;  H(u*, p) = lse - <u*, z>
            #       = (max z - max_nt z) + log S - T * <u*, d>
            cross = (big_m - big_mt_safe) + log_s - temperature * mean_d
            entropy = tl.where(has_mass, tl.log(big_st_safe) - mean_d, 0.0) + poison
            loss = tl.where(has_mass, (1.0 - alpha) * nll + alpha * cross, nll)
            a_eff = tl.where(has_mass, alpha, 0.0)

        tl.store(loss_ptr + row, loss)
        tl.store(nll_ptr + row, nll)
        tl.store(entropy_ptr + row, entropy)

        # ---- pass 2: grad = scale * (p - q) ----------------------------------------
        if WRITE_GRAD:
            inv_st = 1.0 / big_st_safe
            uniform = alpha / n_cols
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                in_row = cols < n_cols
                z = tl.load(row_logits + cols, mask=in_row, other=neg_inf).to(tl.float32)
                p = tl.exp(z - big_m_safe) * inv_s
                is_target = cols == label
                if MODE == 0:
                    q = tl.where(is_target, 1.0, 0.0)
                elif MODE == 1:
                    q = tl.where(is_target, 1.0 - alpha, 0.0) + uniform
                else:
                    # -inf logits give exp(-inf) = 0 here: u*_k = 0 without any 0 * -inf.
                    u = tl.exp((z - big_mt_safe) * inv_temperature) * inv_st
                    q = tl.where(is_target, 1.0 - a_eff, a_eff * u)
                g = (p - q) * scale
                tl.store(row_grad + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


# Triton fixes interpreter vs compiled mode when it is first imported (its own tl.zeros /
# tl.sum are decorated then), so TRITON_INTERPRET=1 must be set before that import; this flag
# records which mode this process got.
INTERPRETED: bool = type(_fused_rows_kernel).__name__ == "InterpretedFunction"


def supports(logits: Tensor) -> bool:
    """Whether triton_fused_rows can run on this tensor's device and dtype (shapes not checked)."""
    return logits.dtype in _SUPPORTED_DTYPES and (
        logits.is_cuda or (INTERPRETED and logits.device.type == "cpu")
    )


def _default_launch(n_cols: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(n_cols), _MAX_BLOCK)
    num_warps = max(1, min(4, block // 256))
    return block, num_warps


def triton_fused_rows(
    logits: Tensor,
    labels: Tensor,
    *,
    regularizer: str,
    alpha: float,
    temperature: float | None,
    ignore_index: int,
    grad_scale: float | Tensor,
    block_size: int | None = None,
    want_grad: bool = True,
    num_warps: int | None = None,
):
    """Per-row loss, NLL, smoothing entropy and scaled logits gradient in one fused kernel.

    Args:
        logits: (N, K) float32 / float16 / bfloat16 / float64 (math in float32), CUDA (or CPU with TRITON_INTERPRET=1).
            Rows must be unit-stride in K; a non-contiguous last dimension is copied.
        labels: (N,) integer class ids in [0, K) or ``ignore_index``; other values give NaN rows.
        regularizer: "labo", "label_smoothing" or "cross_entropy".
        alpha: smoothing mass in [0, 1) (0 for cross_entropy); validated by the caller.
        temperature: T > 0 for "labo", ignored otherwise.
        ignore_index: label value of positions to skip.
        grad_scale: python float or 0-dim float tensor (moved to the logits device without a
            host sync), typically 1 / denominator of the reduction.
        block_size: optional power-of-two columns per step (tests and tuning); default
            min(next_pow2(K), 1024), with min(4, block // 256) warps.
        want_grad: False skips the gradient pass (no (N, K) buffer, one read of the logits)
            and returns grad=None, e.g. for evaluation.
        num_warps: optional warps per program (tuning; ignored by the interpreter).

    Returns:
        FusedRows(loss (N,) float32, nll (N,) float32, smoothing_entropy (N,) float32,
        grad (N, K) logits.dtype or None without want_grad), with zero rows for ignored positions. Nothing is recorded
        for autograd; the caller wires ``grad`` into its autograd.Function.

    Raises:
        ValueError: unsupported device, dtype, shape, regularizer or launch parameters.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(
            f"logits must be a 2-D tensor (N, K); got shape {tuple(getattr(logits, 'shape', ()))}"
        )
    if logits.dtype not in _SUPPORTED_DTYPES:
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
    if regularizer not in _MODES:
        raise ValueError(f"regularizer must be one of {tuple(_MODES)}; got {regularizer!r}")
    mode = _MODES[regularizer]
    alpha = float(alpha)
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"alpha must be in [0, 1); got {alpha}")
    if mode == 0 and alpha != 0.0:
        raise ValueError("alpha must be 0 for regularizer='cross_entropy'")
    if mode == 2:
        if temperature is None or not math.isfinite(float(temperature)) or float(temperature) <= 0.0:
            raise ValueError(f"temperature must be a finite positive number for 'labo'; got {temperature}")
        temp = float(temperature)
    else:
        temp = 1.0  # unused by the kernel outside LABO
    if block_size is None:
        block, default_warps = _default_launch(n_cols)
    else:
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two; got {block_size}")
        block, default_warps = block_size, max(1, min(16, block_size // 256))  # 8 elements/thread
    warps = default_warps if num_warps is None else num_warps

    if not (logits.is_cuda or (INTERPRETED and logits.device.type == "cpu")):
        raise ValueError(
            f"triton_fused_rows needs CUDA tensors (got device {logits.device}); CPU tensors are only "
            "accepted when TRITON_INTERPRET=1 was set before triton was first imported"
        )

    logits = logits.detach()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    labels = labels.detach()
    if labels.dtype != torch.int64:
        labels = labels.to(torch.int64)
    labels = labels.contiguous()

    device = logits.device
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    nll = torch.empty(n_rows, dtype=torch.float32, device=device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=device) if want_grad else None
    if n_rows == 0:
        return FusedRows(loss, nll, entropy, grad)

    if isinstance(grad_scale, Tensor):
        if grad_scale.numel() != 1 or not grad_scale.dtype.is_floating_point:
            raise ValueError("grad_scale tensor must be a single floating-point value")
        # Device-side scale: no .item(), so no host sync when it comes from a device count.
        scale_tensor = grad_scale.detach().reshape(()).to(device=device, dtype=torch.float32)
        scale_is_ptr, scale_value = True, 0.0
    else:
        scale_tensor = loss  # placeholder pointer, never read when SCALE_IS_PTR is False
        scale_is_ptr, scale_value = False, float(grad_scale)

    args = (
        logits,
        labels,
        grad if grad is not None else loss,  # placeholder pointer, never written without WRITE_GRAD
        loss,
        nll,
        entropy,
        scale_tensor,
        scale_value,
        n_cols,
        logits.stride(0),
        n_cols if grad is None else grad.stride(0),
        alpha,
        temp,
        1.0 / temp,
        math.log(n_cols),
        int(ignore_index),
    )
    meta = {"MODE": mode, "SCALE_IS_PTR": scale_is_ptr, "WRITE_GRAD": bool(want_grad), "BLOCK": block}
    if INTERPRETED:
        _fused_rows_kernel[(n_rows,)](*args, **meta)
    else:
        with torch.cuda.device(device):
            # Explicit FMA contraction: today's default, pinned before Triton 3.10 flips it (and
            # silences Triton 3.9's warning about the unset default).
            _fused_rows_kernel[(n_rows,)](*args, **meta, num_warps=warps, enable_fp_fusion=True)
    return FusedRows(loss, nll, entropy, grad)
