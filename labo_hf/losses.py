"""Label-regularized losses: LABO, label smoothing and cross-entropy, as pure torch functions.

Every regularizer trains towards a target distribution per kept position

    q = (1 - alpha) * e_y + alpha * u

and its loss is the cross-entropy H(q, p) with p = softmax(logits). They differ only in u:

- ``"cross_entropy"``: alpha = 0 (no u).
- ``"label_smoothing"``: u uniform over all K classes (torch's ``label_smoothing`` convention).
- ``"labo"``: u = u*, the softmax of ``logits / temperature`` over the non-target classes
  (the closed-form solution of LABO's inner problem; see ``docs/method.md``).

The loss is reduced as the sum over kept positions (labels != ignore_index) divided by
``num_items_in_batch`` when given (the count over the whole accumulated, all-process batch)
and by the local kept count otherwise.

This module imports nothing from transformers: the Trainer subclasses only glue it in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_TEMPERATURE",
    "IMPLEMENTATIONS",
    "REGULARIZERS",
    "FusedRows",
    "LossStats",
    "label_regularized_loss",
    "label_regularized_loss_with_stats",
    "labo_target",
    "resolve_hyperparameters",
]

REGULARIZERS = ("labo", "label_smoothing", "cross_entropy")
IMPLEMENTATIONS = ("auto", "torch", "triton")
DEFAULT_ALPHA = 0.1
DEFAULT_TEMPERATURE = 2.0

# Elements per f32 work buffer in the chunked path (32 MiB; three buffers at most). Each chunk runs
# about a dozen kernels, each an OpenMP fork/join: on a CPU shared with other processes every join
# can wait for a time slice, so few large chunks (16 for 4096 x 32000) are much more robust than
# cache-sized ones (measured 2.2 s vs 14-39 s for 4096 x 32000 on a loaded 2-core machine), at
# ~20% more time on an idle single thread.
_CHUNK_ELEMENTS = 1 << 23


class LossStats(NamedTuple):
    """Sums over the kept positions of one call, for logging (all 0-dim float32, detached).

    Sums rather than means so that they add up across steps, micro-batches and processes.
    """

    nll_sum: Tensor
    """Sum of -log p_y: plain cross-entropy, comparable across regularizers."""
    target_prob_sum: Tensor
    """Sum of p_y, the model's probability of the label."""
    smoothing_entropy_sum: Tensor
    """Sum of H(u): u* for labo, log K for label_smoothing, 0 for cross_entropy (no u)."""
    num_kept: Tensor
    """Number of kept positions (labels != ignore_index)."""


class FusedRows(NamedTuple):
    """Per-row results of a fused loss-and-gradient kernel, for N rows of K logits."""

    loss: Tensor
    """(N,) float32: H(q, p) per row; 0 for ignored rows."""
    nll: Tensor
    """(N,) float32: -log p_y per row; 0 for ignored rows."""
    smoothing_entropy: Tensor
    """(N,) float32: H(u) per row (see LossStats); 0 for ignored rows."""
    grad: Tensor | None
    """(N, K) in the logits' dtype: grad_scale * (p - q), zero rows for ignored rows; None when
    no gradient was asked for."""


def resolve_hyperparameters(
    regularizer: str, alpha: float | None, temperature: float | None
) -> tuple[float, float | None]:
    """Validate a regularizer's hyperparameters and fill in the defaults.

    Returns ``(alpha, temperature)``: alpha is 0.0 for ``"cross_entropy"`` and temperature is
    None unless the regularizer is ``"labo"``. A hyperparameter given to a regularizer that does
    not use it is an error rather than silently ignored.
    """
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
    if regularizer == "cross_entropy":
        if alpha is not None:
            raise ValueError(
                f"alpha={alpha!r} is not used by regularizer='cross_entropy'; leave it unset, "
                "or use regularizer='label_smoothing' or 'labo'"
            )
        resolved_alpha = 0.0
    else:
        resolved_alpha = DEFAULT_ALPHA if alpha is None else alpha
        if isinstance(resolved_alpha, bool) or not isinstance(resolved_alpha, int | float):
            raise ValueError(f"alpha must be a number in [0, 1), got {resolved_alpha!r}")
        if not 0.0 <= float(resolved_alpha) < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {resolved_alpha!r}")
    if regularizer != "labo":
        if temperature is not None:
            raise ValueError(
                f"temperature={temperature!r} is only used by regularizer='labo', "
                f"not {regularizer!r}; leave it unset"
            )
        return float(resolved_alpha), None
    resolved_t = DEFAULT_TEMPERATURE if temperature is None else temperature
    if isinstance(resolved_t, bool) or not isinstance(resolved_t, int | float):
        raise ValueError(f"temperature must be a positive number, got {resolved_t!r}")
    if not (math.isfinite(resolved_t) and resolved_t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {resolved_t!r}")
    return float(resolved_alpha), float(resolved_t)


def _flatten_inputs(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes and label range; return logits (N, K), labels (N,) int64 and kept (N,) bool."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor of shape (..., K)")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        raise ValueError("labels must be an integer tensor of shape (...)")
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape (..., K) with K >= 2 classes, got {tuple(logits.shape)}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the class "
            f"dimension, {tuple(logits.shape[:-1])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    num_classes = logits.shape[-1]
    logits2d = logits.reshape(-1, num_classes)
    labels1d = labels.reshape(-1).long()
    kept = labels1d != ignore_index
    out_of_range = kept & ((labels1d < 0) | (labels1d >= num_classes))
    if bool(out_of_range.any()):
        bad = labels1d[out_of_range][:5].tolist()
        raise ValueError(
            f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; found {bad}"
        )
    return logits2d, labels1d, kept


def labo_target(logits: Tensor, labels: Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
                ignore_index: int = -100) -> Tensor:
    """LABO's optimal smoothing distribution u* (spec section 3), for inspection and plots.

    Args:
        logits: (..., K) any float dtype; treated as constants.
        labels: (...) integer, in [0, K) or ``ignore_index``.
        temperature: T > 0; T -> inf tends to uniform over the K - 1 non-target classes.

    Returns:
        (..., K) float32: ``u*_k = softmax_{k != y}(z_k / T)`` and ``u*_y = 0``. Rows of ignored
        positions are all zero, and so are rows whose non-target logits are all -inf (there is no
        class to put smoothing mass on; the loss then trains towards the one-hot label).
    """
    _, temperature = resolve_hyperparameters("labo", None, temperature)
    logits2d, labels1d, kept = _flatten_inputs(logits, labels, ignore_index)
    z = logits2d.detach().float()
    target = torch.zeros_like(z, dtype=torch.bool)
    target[kept, labels1d[kept]] = True
    u, _ = _labo_smoothing(z, target, temperature)
    # Ignored rows are defined as zero.
    return torch.where(kept.unsqueeze(-1), u, 0.0).reshape(logits.shape)


def _labo_smoothing(z: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """u* and log u* for rows z (M, K) float32 whose label positions are True in target (M, K).

    Rows with no finite non-target logit get u* = 0 (softmax would give 0/0 = NaN there).
    """
    scaled = (z / temperature).masked_fill(target, -math.inf)
    has_mass = torch.isfinite(scaled.amax(dim=-1, keepdim=True))
    log_u = torch.log_softmax(scaled, dim=-1)
    return torch.where(has_mass, log_u.exp(), 0.0), log_u


def _exact_rows(
    x: Tensor, y: Tensor, *, regularizer: str, alpha: float, temperature: float | None, want_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Straightforward per-row H(q, p), -log p_y, H(u) and p - q for kept rows x (M, K) f32.

    Used by the chunked path only for the rare rows it cannot do with shifted exponentials.
    """
    logp = torch.log_softmax(x, dim=-1)
    onehot = torch.zeros_like(x, dtype=torch.bool).scatter_(1, y.unsqueeze(1), True)
    nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    if regularizer == "labo":
        u, log_u = _labo_smoothing(x, onehot, temperature)
        entropy = -torch.where(u > 0, u * log_u, 0.0).sum(-1)
        # With no finite non-target logit the smoothing mass returns to the label: q = e_y.
        a = torch.where(u.sum(dim=-1, keepdim=True) > 0, alpha, 0.0)
        q = (1 - a) * onehot + a * u
    elif regularizer == "label_smoothing":
        num_classes = x.shape[-1]
        q = (1 - alpha) * onehot + alpha / num_classes
        entropy = torch.full_like(nll, math.log(num_classes))
    else:
        q = onehot.float()
        entropy = torch.zeros_like(nll)
    loss = -torch.where(q > 0, q * logp, 0.0).sum(-1)
    grad = logp.exp() - q if want_grad else None
    return loss, nll, entropy, grad


def _chunk_rows(num_classes: int) -> int:
    return max(1, _CHUNK_ELEMENTS // num_classes)


def torch_fused_rows(
    logits: Tensor,
    labels: Tensor,
    *,
    regularizer: str,
    alpha: float,
    temperature: float | None,
    ignore_index: int,
    grad_scale: float | Tensor,
    want_grad: bool = True,
) -> FusedRows:
    """Per-row loss, statistics and scaled gradient in one chunked pass, pure torch.

    Args:
        logits: (N, K) bf16, fp16 or fp32; read in chunks of rows, computed in float32.
        labels: (N,) int64, in [0, K) or ``ignore_index`` (already checked).
        regularizer, alpha, temperature: as returned by ``resolve_hyperparameters``.
        grad_scale: 1 / the reduction's denominator, folded into the gradient.
        want_grad: False skips the (N, K) gradient (evaluation).

    Returns:
        FusedRows. Only the (N, K) gradient outlives the call: the float32 work buffers are a
        few chunks of rows, so backward keeps no (N, K) float32 intermediates.
    """
    n, num_classes = logits.shape
    device = logits.device
    kept = labels != ignore_index
    has_ignored = bool((~kept).any())
    safe_labels = torch.where(kept, labels, 0)
    loss = torch.zeros(n, dtype=torch.float32, device=device)
    nll = torch.zeros_like(loss)
    entropy = torch.zeros_like(loss)
    grad = torch.empty_like(logits) if want_grad else None
    step = _chunk_rows(num_classes)
    rows = min(step, n)
    shifted = torch.empty(rows, num_classes, dtype=torch.float32, device=device)
    probs = torch.empty_like(shifted) if (logits.dtype != torch.float32 or not want_grad) else None
    smooth = torch.empty_like(shifted) if regularizer == "labo" else None
    zero = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        c = stop - start
        x = logits[start:stop]
        y = safe_labels[start:stop].unsqueeze(1)
        keep = kept[start:stop]
        keep_col = keep.unsqueeze(1)
        # exp and sum as separate kernels: torch's fused softmax is faster but its float32
        # accumulation drifts by ~1e-6 relative at K ~ 1e5, beyond the reference tolerance.
        row_max = x.amax(dim=-1, keepdim=True).float()
        d = torch.sub(x, row_max, out=shifted[:c])
        p = grad[start:stop] if probs is None else probs[:c]
        torch.exp(d, out=p)
        sum_exp = p.sum(dim=-1, keepdim=True)
        log_sum = sum_exp.log()
        d_y = d.gather(1, y)
        row_nll = log_sum - d_y
        redo = None
        if regularizer == "labo":
            # Shift by the non-target max, not the row max: when the label's logit dominates,
            # exp((z_k - max z) / T) would underflow for every other class.
            u = torch.mul(d, 1.0 / temperature, out=smooth[:c])
            u.scatter_(1, y, -math.inf)
            max_t = u.amax(dim=-1, keepdim=True)
            u.sub_(max_t).exp_()
            sum_t = u.sum(dim=-1, keepdim=True)
            # <exp(d/T - max_t), d>, reusing d's buffer: d is not needed after this.
            mean_d = d.mul_(u).sum(dim=-1, keepdim=True) / sum_t
            row_loss = log_sum - (1 - alpha) * d_y - alpha * mean_d
            row_entropy = max_t + sum_t.log() - mean_d / temperature
            # NaN from 0 * -inf (classes masked with -inf) or from a row with no finite
            # non-target logit: recompute those rows exactly.
            redo = keep_col & ~torch.isfinite(row_loss)
        elif regularizer == "label_smoothing":
            sum_d = d.sum(dim=-1, keepdim=True)
            row_loss = log_sum - (1 - alpha) * d_y - (alpha / num_classes) * sum_d
            row_entropy = torch.full_like(row_loss, math.log(num_classes))
        else:
            row_loss = row_nll
            row_entropy = torch.zeros_like(row_loss)
        loss[start:stop] = torch.where(keep_col, row_loss, zero).squeeze(1)
        nll[start:stop] = torch.where(keep_col, row_nll, zero).squeeze(1)
        entropy[start:stop] = torch.where(keep_col, row_entropy, zero).squeeze(1)
        if want_grad:
            # grad = scale * (p - q), with q = (1 - a) e_y + a u.
            row_scale = torch.where(keep_col, grad_scale * torch.ones_like(log_sum), zero)
            p.mul_(row_scale / sum_exp)
            if regularizer == "labo":
                p.addcmul_(u, -alpha * row_scale / sum_t)
            elif regularizer == "label_smoothing":
                p.sub_(row_scale * (alpha / num_classes))
            p.scatter_add_(1, y, -(1 - alpha) * row_scale)
            if has_ignored:
                # Ignored rows may hold garbage (even NaN) logits: their gradient is exactly zero.
                p[~keep] = 0.0
            if probs is not None:
                grad[start:stop].copy_(p)
        if redo is not None and bool(redo.any()):
            idx = redo.squeeze(1).nonzero().squeeze(1)
            r_loss, r_nll, r_ent, r_grad = _exact_rows(
                x[idx].float(), y[idx].squeeze(1), regularizer=regularizer, alpha=alpha,
                temperature=temperature, want_grad=want_grad,
            )
            loss[start + idx] = r_loss
            nll[start + idx] = r_nll
            entropy[start + idx] = r_ent
            if want_grad:
                grad[start + idx] = (r_grad * grad_scale).to(grad.dtype)
    return FusedRows(loss, nll, entropy, grad)


class _PrecomputedGradient(torch.autograd.Function):
    """Attach a gradient computed in the forward pass to a loss value.

    Backward scales the stored gradient in place by the upstream gradient (world size, AMP
    scale) instead of allocating a second (N, K) tensor; it therefore runs once per forward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, loss: Tensor, grad: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(grad)
        ctx.used = False
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # noqa: D102
        if ctx.used:
            raise RuntimeError(
                "label_regularized_loss: backward ran twice through the same forward; "
                "recompute the loss instead of using retain_graph=True"
            )
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _select_kernel(implementation: str, logits: Tensor):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "torch" or (implementation == "auto" and not (logits.is_cuda and _triton_available())):
        return torch_fused_rows
    try:
        from labo_hf.triton_kernels import triton_fused_rows
    except ImportError as err:
        raise ValueError(
            f"implementation={implementation!r} needs the optional dependency triton "
            f"(pip install 'labo-hf[triton]'): {err}"
        ) from err
    return triton_fused_rows


def _reduction_scale(num_items_in_batch: int | float | Tensor | None, kept: Tensor) -> Tensor | float:
    """1 / the reduction's denominator; an all-ignored batch keeps a finite scale (its sum is 0)."""
    if num_items_in_batch is None:
        return 1.0 / kept.sum().clamp(min=1).float()
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a single count, got shape {tuple(num_items_in_batch.shape)}"
            )
        return 1.0 / num_items_in_batch.reshape(()).to(kept.device, torch.float32).clamp(min=1)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int | float):
        raise ValueError(f"num_items_in_batch must be a number or a tensor, got {num_items_in_batch!r}")
    if not num_items_in_batch >= 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch!r}")
    if num_items_in_batch == 0:
        if bool(kept.any()):
            raise ValueError("num_items_in_batch=0 but labels has kept positions")
        return 1.0
    return 1.0 / num_items_in_batch


def _raise_for_non_finite(logits2d: Tensor, labels: Tensor, kept: Tensor, regularizer: str) -> None:
    """Explain which input made a kept row's loss non-finite (only runs on failure)."""
    rows = logits2d[kept].float()
    y = labels[kept]
    if torch.isnan(rows).any():
        raise ValueError("logits contain NaN at kept positions")
    if torch.isposinf(rows).any():
        raise ValueError("logits contain +inf at kept positions")
    if torch.isneginf(rows.gather(1, y.unsqueeze(1))).any():
        raise ValueError("logits are -inf at a label's class: the cross-entropy is infinite")
    if regularizer == "label_smoothing":
        raise ValueError(
            "logits contain -inf at kept positions: label smoothing puts mass on every class, so "
            "the loss is infinite (LABO gives masked classes no mass)"
        )
    raise ValueError("the loss is not finite for these logits (overflow in float32)")


def label_regularized_loss_with_stats(
    logits: Tensor,
    labels: Tensor,
    *,
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | Tensor | None = None,
    implementation: str = "auto",
) -> tuple[Tensor, LossStats]:
    """``label_regularized_loss`` plus the sums needed to log it (see ``LossStats``)."""
    alpha, temperature = resolve_hyperparameters(regularizer, alpha, temperature)
    logits2d, labels1d, kept = _flatten_inputs(logits, labels, ignore_index)
    kernel = _select_kernel(implementation, logits)
    scale = _reduction_scale(num_items_in_batch, kept)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    with torch.no_grad():
        rows = kernel(
            logits2d.detach() if logits2d.is_contiguous() else logits2d.detach().contiguous(),
            labels1d,
            regularizer=regularizer,
            alpha=alpha,
            temperature=temperature,
            ignore_index=ignore_index,
            grad_scale=scale,
            want_grad=want_grad,
        )
        if not bool(torch.isfinite(rows.loss).all()):
            _raise_for_non_finite(logits2d.detach(), labels1d, kept, regularizer)
        loss = rows.loss.sum() * scale
        kept_nll = rows.nll
        stats = LossStats(
            nll_sum=kept_nll.sum(),
            target_prob_sum=torch.where(kept, torch.exp(-kept_nll), 0.0).sum(),
            smoothing_entropy_sum=rows.smoothing_entropy.sum(),
            num_kept=kept.sum().float(),
        )
    if want_grad:
        loss = _PrecomputedGradient.apply(logits2d, loss, rows.grad)
    return loss, stats


def label_regularized_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | Tensor | None = None,
    implementation: str = "auto",
) -> Tensor:
    """Label-regularized cross-entropy H(q, p), reduced over kept positions.

    Args:
        logits: (..., K) float32, bf16 or fp16 (computed in float32).
        labels: (...) integer, in [0, K) or ``ignore_index``.
        regularizer: ``"labo"``, ``"label_smoothing"`` or ``"cross_entropy"``.
        alpha: smoothing mass in [0, 1); default 0.1. Must stay None for ``"cross_entropy"``.
        temperature: LABO's T > 0; default 2.0. Must stay None unless ``"labo"``.
        ignore_index: label value of positions that are skipped entirely.
        num_items_in_batch: kept positions in the whole (accumulated, all-process) batch, as the
            Trainer supplies it; None divides by the local kept count.
        implementation: ``"auto"`` (Triton for CUDA tensors when it imports, else torch),
            ``"torch"`` (chunked, pure torch) or ``"triton"``.

    Returns:
        0-dim float32 loss. The gradient w.r.t. logits, p - q per kept position divided by the
        denominator, is computed in the forward pass. An all-ignored batch gives 0 with a zero
        gradient.

    Raises:
        ValueError: bad shapes, labels out of range, hyperparameters out of range, or logits that
            make the loss non-finite (NaN or +inf, -inf at the label; any -inf for label smoothing).
    """
    loss, _ = label_regularized_loss_with_stats(
        logits,
        labels,
        regularizer=regularizer,
        alpha=alpha,
        temperature=temperature,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        implementation=implementation,
    )
    return loss
