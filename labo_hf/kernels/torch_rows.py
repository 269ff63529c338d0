"""Chunked pure-torch implementation of the per-row kernels (any device, every float dtype).

The rows are processed in chunks of about ``chunk_elements`` logits, so that the float32 work
buffers stay a few chunks whatever N is, and on CPU by one single-threaded worker per thread
(``_run_chunks``).

Nothing here synchronises with the host on CUDA except where noted; problems (labels out of range,
non-finite logits) show up as NaN or inf in the per-row results.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor

from labo_hf.kernels import MODE_LABEL_SMOOTHING, MODE_LABO, MODES, RowStats

__all__ = ["CHUNK_ELEMENTS", "backward_rows", "compute_dtype", "forward_rows"]

# Elements per work buffer (4 MiB in float32; two per worker): small enough that the dozen passes
# over a chunk mostly hit the cache.
CHUNK_ELEMENTS = 1 << 20
# On a GPU each op of a chunk is a kernel launch: larger chunks (64 MiB buffers) keep them few.
GPU_CHUNK_ELEMENTS = 1 << 24
_MAX_WORKERS = 8


def _chunk_rows(chunk_elements: int, num_classes: int, device: torch.device) -> int:
    if device.type != "cpu":
        chunk_elements = max(chunk_elements, GPU_CHUNK_ELEMENTS)
    return max(1, chunk_elements // num_classes)


def _run_chunks(n: int, step: int, device: torch.device, body, make_buffers) -> None:
    """Run ``body(start, stop, buffers)`` over the row chunks [start, stop) of N rows.

    On a CPU with several threads, the chunks go to one Python worker per thread, each running its
    ops with intra-op parallelism off: every whole-chunk op would otherwise be an OpenMP fork/join,
    and on a CPU shared with other processes each join waits for a descheduled thread (measured
    14-39 s instead of 2.2 s for 4096 x 32000, bench/results/README.md, section 1). The ops release
    the GIL, so the workers run in parallel; their chunks are disjoint, so are their writes.
    """
    starts = list(range(0, n, step))
    # At most 8 workers: the passes are memory-bound, and each worker holds its own buffers.
    workers = min(torch.get_num_threads(), len(starts), _MAX_WORKERS) if device.type == "cpu" else 1
    if workers <= 1:
        buffers = make_buffers()
        for start in starts:
            body(start, min(start + step, n), buffers)
        return

    def run_group(first: int) -> None:
        buffers = make_buffers()
        for start in starts[first::workers]:
            body(start, min(start + step, n), buffers)

    threads = torch.get_num_threads()
    # Process-wide setting, restored below; the calling thread only waits meanwhile.
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(run_group, w) for w in range(workers)]:
                future.result()
    finally:
        torch.set_num_threads(threads)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 logits are computed in float64 (1e300 stays finite); everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _label_masks(labels: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """kept (N,) bool, bad (N,) bool (kept but outside [0, K)), and labels safe to index with (N,)."""
    kept = labels != ignore_index
    bad = kept & ((labels < 0) | (labels >= num_classes))
    safe = torch.where(kept & ~bad, labels, 0)
    return kept, bad, safe


class _Pass(NamedTuple):
    """What the forward and the backward pass derive from their arguments before walking the chunks."""

    logits: Tensor
    """(N, K) detached: the chunk workers do not inherit the caller's autograd state."""
    compute_dtype: torch.dtype
    mode: int
    kept: Tensor
    """(N,) bool."""
    bad: Tensor
    """(N,) bool: kept but outside [0, K)."""
    safe: Tensor
    """(N,) labels safe to index with."""
    step: int
    """Rows per chunk."""

    def rows(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        """The chunk [start, stop): logits (c, K), safe labels (c, 1), kept (c, 1)."""
        return self.logits[start:stop], self.safe[start:stop].unsqueeze(1), self.kept[start:stop].unsqueeze(1)

    def buffer(self) -> Tensor:
        """A work buffer (rows of one chunk, K) in the compute dtype."""
        n, num_classes = self.logits.shape
        return torch.empty(min(self.step, n), num_classes, dtype=self.compute_dtype, device=self.logits.device)

    def run(self, body, make_buffers) -> None:
        """``body(start, stop, buffers)`` over every chunk (see ``_run_chunks``)."""
        _run_chunks(self.logits.shape[0], self.step, self.logits.device, body, make_buffers)


def _start_pass(logits: Tensor, labels: Tensor, regularizer: str, ignore_index: int, chunk_elements: int) -> _Pass:
    logits = logits.detach()
    num_classes = logits.shape[1]
    kept, bad, safe = _label_masks(labels, num_classes, ignore_index)
    return _Pass(logits, compute_dtype(logits.dtype), MODES[regularizer], kept, bad, safe,
                 _chunk_rows(chunk_elements, num_classes, logits.device))


def _mask_ignored_rows(g: Tensor, keep_col: Tensor) -> None:
    # Ignored rows may hold garbage (even NaN) logits: their gradient is exactly zero. On CPU the
    # check costs nothing and usually skips a pass; on CUDA it would be a host sync.
    if g.is_cuda or bool((~keep_col).any()):
        g.masked_fill_(~keep_col, 0.0)


def _labo_chunk_terms(x: Tensor, y: Tensor, d: Tensor, buf_e: Tensor, m: Tensor, log_s: Tensor, row_nll: Tensor,
                      *, alpha: float, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LABO's loss, H(u*), nt_max and log_sum_t for one chunk (each (c, 1)).

    x: the chunk's logits (c, K); y: safe labels (c, 1); d = x - m in a work buffer (overwritten); buf_e: the other
    work buffer (c, K); m, log_s, row_nll: the chunk's row max, log-sum-exp shifted by m, and NLL.
    """
    lowest = torch.finfo(d.dtype).min
    # Shift by the non-target max, not the row max: when the label's logit dominates,
    # exp((z_k - max z) / T) would underflow for every other class, and z_k - max z would
    # absorb the non-target logits' differences (5 - 1e38 == 0 - 1e38 in float32). The
    # masked max of d only locates it; its value is read back from the logits, exactly.
    d.scatter_(1, y, -math.inf)
    located = d.max(dim=-1, keepdim=True)
    # All non-target logits -inf: the max may then point at the masked label itself.
    nt_max = torch.where(located.values > -math.inf, x.gather(1, located.indices).to(d.dtype), -math.inf)
    # No finite non-target logit: nowhere to put the smoothing mass, q = e_y.
    has_mass = nt_max > -math.inf
    # d is free now: t = (z - nt_max) / T in place, the label and -inf classes clamped to the
    # lowest float so that exp gives 0 and 0 * t stays 0 (NaN logits still propagate).
    t = torch.sub(x, torch.where(has_mass, nt_max, 0.0), out=d)
    if temperature != 1.0:
        t.mul_(1.0 / temperature)
    t.scatter_(1, y, -math.inf).clamp_(min=lowest)
    e_t = torch.exp(t, out=buf_e)
    st = e_t.sum(dim=-1, keepdim=True)
    st_safe = torch.where(has_mass, st, 1.0)
    mean_t = e_t.mul_(t).sum(dim=-1, keepdim=True) / st_safe  # <u*, (z - nt_max) / T> <= 0
    # H(u*, p) = lse - <u*, z> = log_s - T <u*, (z - nt_max) / T> - (nt_max - m).
    cross = log_s - temperature * mean_t - (nt_max - m)
    row_loss = torch.where(has_mass, (1 - alpha) * row_nll + alpha * cross, row_nll)
    # log u*_k = (z_k - nt_max) / T - log st, so H(u*) = log st - <u*, (z - nt_max) / T>.
    row_entropy = torch.where(has_mass, st_safe.log() - mean_t, 0.0)
    log_st = torch.where(has_mass, st_safe.log(), 0.0)
    return row_loss, row_entropy, nt_max, log_st


def forward_rows(
    logits: Tensor,
    labels: Tensor,
    *,
    regularizer: str,
    alpha: float,
    temperature: float | None,
    ignore_index: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> RowStats:
    """Per-row loss, logging statistics and the gradient's statistics, reading the logits once.

    Args:
        logits: (N, K) any float dtype, rows may be strided (``stride(-1)`` need not be 1).
        labels: (N,) integer; values outside [0, K) other than ``ignore_index`` poison their row.
        regularizer, alpha, temperature: as returned by ``labo_hf.loss.config.resolve_hyperparameters``.
        chunk_elements: work-buffer size in elements.

    Returns:
        RowStats, every field (N,) in ``compute_dtype(logits.dtype)``.
    """
    row_pass = _start_pass(logits, labels, regularizer, ignore_index, chunk_elements)
    n, num_classes = row_pass.logits.shape
    work_dtype, mode = row_pass.compute_dtype, row_pass.mode
    out = RowStats(*(torch.zeros(n, dtype=work_dtype, device=logits.device) for _ in RowStats._fields))

    def buffers():
        return row_pass.buffer(), row_pass.buffer()

    def chunk(start, stop, bufs):
        buf_d, buf_e = bufs
        c = stop - start
        x, y, keep = row_pass.rows(start, stop)
        m = x.amax(dim=-1, keepdim=True).to(work_dtype)
        # exp and sum as separate kernels: torch's fused softmax is faster but its float32
        # accumulation drifts by ~1e-6 relative at K ~ 1e5, beyond the reference tolerance.
        d = torch.sub(x, m, out=buf_d[:c])
        s = torch.exp(d, out=buf_e[:c]).sum(dim=-1, keepdim=True)
        log_s = s.log()
        d_y = d.gather(1, y)
        row_nll = log_s - d_y
        nt_max = log_st = None
        if mode == MODE_LABO:
            row_loss, row_entropy, nt_max, log_st = _labo_chunk_terms(
                x, y, d, buf_e[:c], m, log_s, row_nll, alpha=alpha, temperature=temperature)
        elif mode == MODE_LABEL_SMOOTHING:
            sum_d = d.sum(dim=-1, keepdim=True)
            row_loss = log_s - (1 - alpha) * d_y - (alpha / num_classes) * sum_d
            row_entropy = torch.full_like(row_loss, math.log(num_classes))
        else:
            row_loss = row_nll
            row_entropy = torch.zeros_like(row_loss)
        poison = torch.where(row_pass.bad[start:stop].unsqueeze(1), math.nan, 0.0)
        fields = [(out.loss, row_loss), (out.nll, row_nll), (out.smoothing_entropy, row_entropy),
                  (out.row_max, m), (out.log_sum, log_s)]
        if mode == MODE_LABO:
            fields += [(out.nt_max, nt_max), (out.log_sum_t, log_st)]
        for dest, value in fields:
            dest[start:stop] = (torch.where(keep, value, 0.0) + poison).squeeze(1)

    row_pass.run(chunk, buffers)
    return out


def backward_rows(
    grad_rows: Tensor,
    logits: Tensor,
    labels: Tensor,
    stats: RowStats,
    *,
    regularizer: str,
    alpha: float,
    temperature: float | None,
    ignore_index: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """``grad_rows[i] * (p_i - q_i)`` for every row, re-reading the logits once.

    Args:
        grad_rows: (N,) the upstream gradient of each row's loss (any float dtype; read on device).
        logits, labels, regularizer, alpha, temperature, ignore_index: as given to ``forward_rows``.
        stats: ``forward_rows``'s result for the same inputs.

    Returns:
        (N, K) contiguous, in the logits' dtype: computed in the compute dtype and rounded once, so
        a large ``grad_rows`` (a loss scale) lifts small entries before the rounding. Zero rows for
        ignored rows, NaN rows for poisoned ones.
    """
    row_pass = _start_pass(logits, labels, regularizer, ignore_index, chunk_elements)
    n, num_classes = row_pass.logits.shape
    work_dtype, mode = row_pass.compute_dtype, row_pass.mode
    coef = (torch.where(row_pass.kept, grad_rows.detach().to(device=logits.device, dtype=work_dtype), 0.0)
            + torch.where(row_pass.bad, math.nan, 0.0))
    grad = torch.empty((n, num_classes), dtype=logits.dtype, device=logits.device)
    in_place = logits.dtype == work_dtype
    inv_t = 1.0 / temperature if mode == MODE_LABO else 1.0

    def buffers():
        return None if in_place else row_pass.buffer(), row_pass.buffer() if mode == MODE_LABO else None

    def chunk(start, stop, bufs):
        buf_g, buf_u = bufs
        c = stop - start
        x, y, keep = row_pass.rows(start, stop)
        chunk_coef = coef[start:stop].unsqueeze(1)
        m = stats.row_max[start:stop].unsqueeze(1)
        log_s = stats.log_sum[start:stop].unsqueeze(1)
        g = torch.sub(x, m, out=grad[start:stop] if in_place else buf_g[:c])
        # p * coef, coef and 1 / sum folded into one multiply.
        g.exp_().mul_(chunk_coef * torch.exp(-log_s))
        if mode == MODE_LABO:
            nt_max = stats.nt_max[start:stop].unsqueeze(1)
            has_mass = nt_max > -math.inf
            a_row = has_mass.to(work_dtype) * alpha  # not where(): its Python scalar would be float32
            # Rows without mass: shift by +inf so that u* = exp(-inf) = 0 without 0 * inf.
            shift = torch.where(has_mass, nt_max, math.inf)
            u = torch.sub(x, shift, out=buf_u[:c])
            if inv_t != 1.0:
                u.mul_(inv_t)
            u.exp_()
            u_coef = torch.where(has_mass, chunk_coef * alpha * torch.exp(-stats.log_sum_t[start:stop].unsqueeze(1)), 0.0)
            g.addcmul_(u, -u_coef)
            q_y = 1.0 - a_row
        elif mode == MODE_LABEL_SMOOTHING:
            g.sub_(chunk_coef * (alpha / num_classes))
            q_y = 1.0 - alpha + alpha / num_classes
        else:
            q_y = 1.0
        # The label's entry recomputed on its own: u* there was never meant to be included, and
        # exp((z_y - nt_max) / T) may even overflow when the label dominates.
        p_y = torch.exp((x.gather(1, y).to(work_dtype) - m) - log_s)
        g.scatter_(1, y, chunk_coef * (p_y - q_y))
        _mask_ignored_rows(g, keep)
        if not in_place:
            grad[start:stop].copy_(g)

    row_pass.run(chunk, buffers)
    return grad

