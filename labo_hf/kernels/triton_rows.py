"""Fused Triton implementation of the per-row kernels (CUDA; CPU under TRITON_INTERPRET=1).

Two kernels, one program per row:

* ``_forward_kernel`` streams the row once and keeps per-lane online statistics (a BLOCK-wide
  vector of running maxima and rescaled sums, merged at the end, one exp per element and
  statistic): max and sum of exp at temperature 1; for LABO the max over the non-target logits,
  the sum of exp((z - m) / T) and the running sum of exp(d) * d with d = (z - m) / T (everything
  H(u*) and <u*, z> need without cancellation); for label smoothing the sum of (z - z_y). It writes
  the per-row loss, NLL, H(u) and the four statistics of ``RowStats``.
* ``_backward_kernel`` streams the row again and writes ``grad_rows[row] * (p - q)`` once, in the
  logits' dtype, computed in float32 from those statistics.

Traffic per training step: read, read, write = 3 N K elements. Exponentials are ``exp2`` of
pre-scaled arguments (``tl.exp`` lowers to a scale plus ``ex2.approx`` plus range fix-ups).
Row offsets are int64 (N K exceeds 2**31 for long sequences and 256k vocabularies); column
indices and the label compare are int32. Each row is walked as an unaligned masked head (up to
the first 16-byte boundary), an unmasked main loop whose loads the compiler may vectorise
(odd K such as 58101 included), and a masked tail. Rows may be strided (``stride(0) != K``)
without a copy.

Ignored rows (label == ignore_index) never read their logits. A kept label outside [0, K) poisons
its row with NaN (loss, statistics, gradient) rather than reading out of bounds: the caller
reports it without a host synchronisation.

Importing this module raises ImportError when triton is not installed.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from labo_hf import kernels
from labo_hf.kernels import RowStats
from labo_hf.kernels.triton_launch import (
    block_and_warps,
    check_args,
    device_supported,
    launch,
    launch_config,
    prepare,
    vector_width,
)

__all__ = ["INTERPRETED", "backward_rows", "forward_rows", "launch_config", "supports"]

# The shared constants of labo_hf.kernels as compile-time globals: a @triton.jit body reads no other kind.
MODE_CROSS_ENTROPY = tl.constexpr(kernels.MODE_CROSS_ENTROPY)
MODE_LABEL_SMOOTHING = tl.constexpr(kernels.MODE_LABEL_SMOOTHING)
MODE_LABO = tl.constexpr(kernels.MODE_LABO)
LOG2E = tl.constexpr(kernels.LOG2E)
LN2 = tl.constexpr(kernels.LN2)


@triton.jit
def _accumulate(z, is_target, in_row, m1, s1, mt, st, wt, sz, ls_shift, inv_t_log2e,
                MODE: tl.constexpr, MASKED: tl.constexpr):
    """One block of the online statistics (see the module docstring); z is float32, -inf outside the row."""
    neg_inf = float("-inf")
    # One exp per element and statistic: exp(-|z - m|) is both the rescale factor of the running
    # sum when z is a new lane maximum and the new term otherwise. -inf entries contribute nothing
    # and must not turn (-inf) - (-inf) into NaN, even in lanes a where() discards.
    up = z > m1
    ref = tl.where(z == neg_inf, 0.0, m1)
    e = tl.exp2(tl.where(up, ref - z, z - ref) * LOG2E)
    s1 = tl.where(up, s1 * e + 1.0, s1 + e)
    m1 = tl.where(up, z, m1)
    if MODE == MODE_LABO:
        # Same update at temperature T over the non-target classes, plus wt = sum e^d * d in base-2
        # units (d = (z - mt) / T * log2 e), rebased when the lane maximum moves.
        zt = tl.where(is_target, neg_inf, z)
        up_t = zt > mt
        ref_t = tl.where(zt == neg_inf, 0.0, mt)
        gap_t = tl.where(up_t, ref_t - zt, zt - ref_t) * inv_t_log2e
        e_t = tl.exp2(gap_t)
        gap_t0 = tl.where(gap_t == neg_inf, 0.0, gap_t)  # e_t = 0 there: avoid 0 * -inf
        wt = tl.where(up_t, e_t * (wt + st * gap_t0), wt + e_t * gap_t0)
        st = tl.where(up_t, st * e_t + 1.0, st + e_t)
        mt = tl.where(up_t, zt, mt)
    if MODE == MODE_LABEL_SMOOTHING:
        if MASKED:
            sz += tl.where(in_row, z - ls_shift, 0.0)
        else:
            sz += z - ls_shift
    return m1, s1, mt, st, wt, sz


@triton.jit
def _forward_kernel(
    logits_ptr, labels_ptr, loss_ptr, nll_ptr, entropy_ptr, row_max_ptr, log_sum_ptr, nt_max_ptr,
    log_sum_t_ptr, n_cols, stride_row, alpha, temperature, inv_t_log2e, log_n_cols, ignore_index,
    MODE: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    neg_inf = float("-inf")
    if label == ignore_index:
        # Padding costs no read of its logits.
        tl.store(loss_ptr + row, 0.0)
        tl.store(nll_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(row_max_ptr + row, 0.0)
        tl.store(log_sum_ptr + row, 0.0)
        tl.store(nt_max_ptr + row, 0.0)
        tl.store(log_sum_t_ptr + row, 0.0)
    else:
        valid = (label >= 0) & (label < n_cols)
        poison = tl.where(valid, 0.0, float("nan"))
        label32 = tl.where(valid, label, -1).to(tl.int32)
        row_start = row * stride_row
        row_ptr = logits_ptr + row_start
        z_y = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32)
        offs = tl.arange(0, BLOCK)
        # Head up to the first VEC-aligned element; then whole unmasked blocks; then a masked tail.
        head = ((VEC - row_start % VEC) % VEC).to(tl.int32)
        head = tl.minimum(head, n_cols)
        body_end = head + ((n_cols - head) // BLOCK) * BLOCK
        body_ptr = logits_ptr + tl.multiple_of(row_start + head, VEC)

        m1 = tl.full([BLOCK], neg_inf, tl.float32)
        s1 = tl.zeros([BLOCK], tl.float32)
        mt = tl.full([BLOCK], neg_inf, tl.float32)
        st = tl.zeros([BLOCK], tl.float32)
        wt = tl.zeros([BLOCK], tl.float32)
        sz = tl.zeros([BLOCK], tl.float32)
        # z_y as the LS shift keeps sum(z) small for large logits; 0 if z_y is -inf.
        ls_shift = tl.where(z_y == neg_inf, 0.0, z_y)

        in_head = offs < head
        z = tl.load(row_ptr + offs, mask=in_head, other=neg_inf).to(tl.float32)
        m1, s1, mt, st, wt, sz = _accumulate(z, offs == label32, in_head, m1, s1, mt, st, wt, sz, ls_shift,
                                             inv_t_log2e, MODE, True)
        for start in range(0, body_end - head, BLOCK):
            start = tl.multiple_of(start, BLOCK)
            z = tl.load(body_ptr + start + offs).to(tl.float32)
            cols = head + start + offs
            m1, s1, mt, st, wt, sz = _accumulate(z, cols == label32, in_head, m1, s1, mt, st, wt, sz,
                                                 ls_shift, inv_t_log2e, MODE, False)
        cols = body_end + offs
        in_tail = cols < n_cols
        z = tl.load(row_ptr + cols, mask=in_tail, other=neg_inf).to(tl.float32)
        m1, s1, mt, st, wt, sz = _accumulate(z, cols == label32, in_tail, m1, s1, mt, st, wt, sz, ls_shift,
                                             inv_t_log2e, MODE, True)

        # Merge the lanes.
        big_m = tl.max(m1, axis=0)
        big_m_safe = tl.where(big_m == neg_inf, 0.0, big_m)
        big_s = tl.sum(s1 * tl.exp2((m1 - big_m_safe) * LOG2E), axis=0)
        log_s = tl.log2(big_s) * LN2
        nll = (big_m - z_y) + log_s + poison
        if MODE == MODE_CROSS_ENTROPY:
            loss = nll
            entropy = 0.0 + poison
            nt_max = 0.0 + poison
            log_st = 0.0 + poison
        elif MODE == MODE_LABEL_SMOOTHING:
            # loss = lse - (1-a) z_y - a mean(z) = nll - a * mean(z - z_y)
            mean_shifted = tl.sum(sz, axis=0) / n_cols
            loss = tl.where(z_y == neg_inf, float("inf"), nll - alpha * mean_shifted)
            entropy = log_n_cols + poison
            nt_max = 0.0 + poison
            log_st = 0.0 + poison
        else:
            big_mt = tl.max(mt, axis=0)
            big_mt_safe = tl.where(big_mt == neg_inf, 0.0, big_mt)
            lane_rebase = tl.where(mt == neg_inf, 0.0, (mt - big_mt_safe) * inv_t_log2e)
            lane_ratio = tl.exp2((mt - big_mt_safe) * inv_t_log2e)
            big_st = tl.sum(st * lane_ratio, axis=0)
            big_wt = tl.sum(lane_ratio * (wt + st * lane_rebase), axis=0)
            # Degenerate row (every non-target logit -inf, or K == 1): the smoothing mass has
            # nowhere to go, so q = e_y and H(u*) = 0.
            has_mass = big_st > 0.0
            big_st_safe = tl.where(has_mass, big_st, 1.0)
            mean_d = big_wt / big_st_safe * LN2  # <u*, (z - max_nt z) / T>, <= 0
            log_st = tl.log2(big_st_safe) * LN2
            # H(u*) = log S_T - <u*, d>;  H(u*, p) = lse - <u*, z> = (max z - max_nt z) + log S - T <u*, d>
            cross = (big_m - big_mt_safe) + log_s - temperature * mean_d
            entropy = tl.where(has_mass, log_st - mean_d, 0.0) + poison
            loss = tl.where(has_mass, (1.0 - alpha) * nll + alpha * cross, nll)
            nt_max = tl.where(has_mass, big_mt, neg_inf) + poison
            log_st = tl.where(has_mass, log_st, 0.0) + poison
        tl.store(loss_ptr + row, loss)
        tl.store(nll_ptr + row, nll)
        tl.store(entropy_ptr + row, entropy)
        tl.store(row_max_ptr + row, big_m + poison)
        tl.store(log_sum_ptr + row, log_s + poison)
        tl.store(nt_max_ptr + row, nt_max)
        tl.store(log_sum_t_ptr + row, log_st)


@triton.jit
def _gradient(z, is_target, m, log_s2, nt_shift, inv_t_log2e, log_st2, q_y, a_u, uniform, coef,
              MODE: tl.constexpr):
    """coef * (p - q) for one block of float32 logits (base-2 arguments precomputed per row)."""
    # (z - m) first: z * log2e alone overflows float32 for |z| > 2.4e38.
    p = tl.exp2((z - m) * LOG2E - log_s2)
    if MODE == MODE_LABO:
        # Rows without smoothing mass have nt_shift = +inf: u = exp2(-inf) = 0, and a_u = 0.
        u = tl.exp2((z - nt_shift) * inv_t_log2e - log_st2)
        q = tl.where(is_target, q_y, a_u * u)
    elif MODE == MODE_LABEL_SMOOTHING:
        q = tl.where(is_target, q_y, uniform)
    else:
        q = tl.where(is_target, q_y, 0.0)
    return (p - q) * coef


@triton.jit
def _gradient_block(src, dst, is_target, mask, m, log_s2, nt_shift, inv_t_log2e, log_st2, q_y, a_u, uniform, coef,
                    MODE: tl.constexpr, MASKED: tl.constexpr):
    """Load one block of logits, write its gradient; MASKED=False for the main loop (vector accesses)."""
    if MASKED:
        z = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    else:
        z = tl.load(src).to(tl.float32)
    g = _gradient(z, is_target, m, log_s2, nt_shift, inv_t_log2e, log_st2, q_y, a_u, uniform, coef, MODE)
    if MASKED:
        tl.store(dst, g.to(dst.dtype.element_ty), mask=mask)
    else:
        tl.store(dst, g.to(dst.dtype.element_ty))


@triton.jit
def _backward_kernel(
    grad_rows_ptr, stride_grad_rows, logits_ptr, labels_ptr, row_max_ptr, log_sum_ptr, nt_max_ptr,
    log_sum_t_ptr, grad_ptr, n_cols, stride_row, alpha, inv_t_log2e, ignore_index,
    MODE: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, SAME_LAYOUT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    offs = tl.arange(0, BLOCK)
    grad_row = grad_ptr + row * n_cols
    if label == ignore_index:
        # Padding costs one write of zeros and no read of its logits.
        zeros = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            tl.store(grad_row + cols, zeros, mask=cols < n_cols)
    else:
        valid = (label >= 0) & (label < n_cols)
        label32 = tl.where(valid, label, -1).to(tl.int32)
        # The upstream gradient is read on the device (no host sync) and applied in float32
        # before the one rounding to the logits' dtype: a loss scale of 65536 lifts entries that
        # 1 / N would otherwise flush to zero in fp16.
        coef = tl.load(grad_rows_ptr + row * stride_grad_rows).to(tl.float32) + tl.where(valid, 0.0, float("nan"))
        m = tl.load(row_max_ptr + row)
        log_s2 = tl.load(log_sum_ptr + row) * LOG2E
        a_u = 0.0
        nt_shift = 0.0
        log_st2 = 0.0
        uniform = 0.0
        if MODE == MODE_LABO:
            nt_max = tl.load(nt_max_ptr + row)
            has_mass = nt_max > float("-inf")
            a_u = tl.where(has_mass, alpha, 0.0)
            nt_shift = tl.where(has_mass, nt_max, float("inf"))
            log_st2 = tl.where(has_mass, tl.load(log_sum_t_ptr + row), 0.0) * LOG2E
            q_y = 1.0 - a_u
        elif MODE == MODE_LABEL_SMOOTHING:
            uniform = alpha / n_cols
            q_y = 1.0 - alpha + uniform
        else:
            q_y = 1.0
        row_start = row * stride_row
        row_ptr = logits_ptr + row_start
        head = ((VEC - row_start % VEC) % VEC).to(tl.int32)
        head = tl.minimum(head, n_cols)
        body_end = head + ((n_cols - head) // BLOCK) * BLOCK
        body_ptr = logits_ptr + tl.multiple_of(row_start + head, VEC)
        if SAME_LAYOUT:
            # grad rows start where the logits rows do (stride K): the same head aligns both.
            body_grad = grad_ptr + tl.multiple_of(row * n_cols + head, VEC)
        else:
            body_grad = grad_row + head

        in_head = offs < head
        _gradient_block(row_ptr + offs, grad_row + offs, offs == label32, in_head, m, log_s2, nt_shift,
                        inv_t_log2e, log_st2, q_y, a_u, uniform, coef, MODE, True)
        for start in range(0, body_end - head, BLOCK):
            start = tl.multiple_of(start, BLOCK)
            _gradient_block(body_ptr + start + offs, body_grad + start + offs, head + start + offs == label32,
                            in_head, m, log_s2, nt_shift, inv_t_log2e, log_st2, q_y, a_u, uniform, coef, MODE,
                            False)
        cols = body_end + offs
        _gradient_block(row_ptr + cols, grad_row + cols, cols == label32, cols < n_cols, m, log_s2, nt_shift,
                        inv_t_log2e, log_st2, q_y, a_u, uniform, coef, MODE, True)


# Triton fixes interpreter vs compiled mode when it is first imported, so TRITON_INTERPRET=1 must
# be set before that import; this flag records which mode this process got.
INTERPRETED: bool = type(_forward_kernel).__name__ == "InterpretedFunction"


def supports(logits: Tensor) -> bool:
    """Whether these kernels can run on this tensor's device and dtype (shapes not checked)."""
    return device_supported(logits, INTERPRETED)


def forward_rows(logits: Tensor, labels: Tensor, *, regularizer: str, alpha: float, temperature: float | None,
                 ignore_index: int, block_size: int | None = None, num_warps: int | None = None) -> RowStats:
    """Per-row loss and statistics in one read of the logits (see ``labo_hf.kernels``).

    Args:
        logits: (N, K) float32 / float16 / bfloat16 / float64 (math in float32), CUDA, or CPU under
            the interpreter. Rows may be strided; a non-unit column stride is copied.
        labels: (N,) integer class ids in [0, K) or ``ignore_index``; other values poison their row.
        block_size, num_warps: launch overrides (tests and tuning); default ``launch_config``.

    Returns:
        RowStats of float32 (N,) tensors.
    """
    mode, alpha, temp = check_args(logits, labels, regularizer, alpha, temperature, block_size, interpreted=INTERPRETED)
    logits, labels = prepare(logits, labels)
    n_rows, n_cols = logits.shape
    out = RowStats(*(torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in RowStats._fields))
    if n_rows == 0:
        return out
    block, warps = block_and_warps(n_cols, "forward", block_size)
    args = (logits, labels, *out, n_cols, logits.stride(0), alpha, temp, kernels.LOG2E / temp, math.log(n_cols),
            int(ignore_index))
    meta = {"MODE": mode, "BLOCK": block, "VEC": vector_width(logits.dtype)}
    launch(_forward_kernel, (n_rows,), args, meta, logits.device, num_warps or warps, interpreted=INTERPRETED)
    return out


def backward_rows(grad_rows: Tensor, logits: Tensor, labels: Tensor, stats: RowStats, *, regularizer: str,
                  alpha: float, temperature: float | None, ignore_index: int, block_size: int | None = None,
                  num_warps: int | None = None) -> Tensor:
    """``grad_rows[i] * (p_i - q_i)`` in one more read of the logits and one write of the gradient.

    Args:
        grad_rows: (N,) upstream gradient per row, any float dtype, any stride (an expanded scalar
            included); read on the device.
        stats: ``forward_rows``'s result (either implementation's: the statistics are the same).

    Returns:
        (N, K) contiguous gradient in the logits' dtype.
    """
    mode, alpha, temp = check_args(logits, labels, regularizer, alpha, temperature, block_size, interpreted=INTERPRETED)
    logits, labels = prepare(logits, labels)
    n_rows, n_cols = logits.shape
    grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return grad
    if grad_rows.dim() != 1 or grad_rows.shape[0] != n_rows:
        raise ValueError(f"grad_rows must have shape ({n_rows},); got {tuple(grad_rows.shape)}")
    grad_rows = grad_rows.detach().to(device=logits.device, dtype=torch.float32)
    stat = [t.detach().to(device=logits.device, dtype=torch.float32).contiguous()
            for t in (stats.row_max, stats.log_sum, stats.nt_max, stats.log_sum_t)]
    block, warps = block_and_warps(n_cols, "backward", block_size)
    args = (grad_rows, grad_rows.stride(0), logits, labels, *stat, grad, n_cols, logits.stride(0), alpha,
            kernels.LOG2E / temp, int(ignore_index))
    meta = {"MODE": mode, "BLOCK": block, "VEC": vector_width(logits.dtype), "SAME_LAYOUT": logits.stride(0) == n_cols}
    launch(_backward_kernel, (n_rows,), args, meta, logits.device, num_warps or warps, interpreted=INTERPRETED)
    return grad

