"""Label-regularized losses: LABO, label smoothing and cross-entropy, as pure torch functions.

Every regularizer trains towards a target distribution per kept position

    q = (1 - alpha) * e_y + alpha * u

and its loss is the cross-entropy H(q, p) with p = softmax(logits). They differ only in u:

- ``"cross_entropy"``: alpha = 0 (no u).
- ``"label_smoothing"``: u uniform over all K classes (torch's ``label_smoothing`` convention).
- ``"labo"``: u = u*, the softmax of ``logits / temperature`` over the non-target classes
  (the closed-form solution of LABO's inner problem; see ``docs/method.md``, section 3).

The loss is reduced as the sum over kept positions (labels != ignore_index) divided by
``num_items_in_batch`` when given (the count over the whole accumulated, all-process batch)
and by the local kept count otherwise. ``label_regularized_loss_per_position`` returns the per-position
losses unreduced, from the same op.

Layering: the per-row math lives in ``labo_hf.kernels`` (one module per implementation); this
module validates the arguments, dispatches, reduces, and owns the autograd op. It imports nothing
from transformers: the Trainer subclasses only glue it in.

Autograd contract (docs/method.md, section 4): the forward pass keeps a few per-row statistics,
the backward pass recomputes ``p - q`` from the logits in float32 and multiplies it by the upstream
gradient before rounding once to the logits' dtype (exact under fp16 loss scaling). The ops are
registered with ``torch.library`` so that ``torch.compile(fullgraph=True)`` traces them.
Second derivatives are not supported (a clear error; ``labo_hf.reference`` is twice
differentiable), nor are ``torch.func`` transforms (a clear error).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from labo_hf.kernels import FusedRows, RowStats
from labo_hf.kernels import torch_rows as _torch_rows
from labo_hf.kernels.torch_rows import compute_dtype as _compute_dtype

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_TEMPERATURE",
    "IMPLEMENTATIONS",
    "MIN_TEMPERATURE",
    "REGULARIZERS",
    "FusedRows",
    "LossStats",
    "check_loss_stats",
    "label_regularized_loss",
    "label_regularized_loss_per_position",
    "label_regularized_loss_with_stats",
    "labo_target",
    "resolve_hyperparameters",
]

REGULARIZERS = ("labo", "label_smoothing", "cross_entropy")
IMPLEMENTATIONS = ("auto", "torch", "triton")
DEFAULT_ALPHA = 0.1
DEFAULT_TEMPERATURE = 2.0
# Below this, 1 / T and the tempered logits leave float32's range (1e-39 is not even a normal
# float32), and u* is the one-hot of the top non-target class to within float32 anyway.
MIN_TEMPERATURE = 1e-30

# Elements per work buffer of the chunked torch path; read at each call (tests shrink it).
_CHUNK_ELEMENTS = _torch_rows.CHUNK_ELEMENTS
# Whether triton is installed, decided once: a lookup inside a traced function would break graphs.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


class LossStats(NamedTuple):
    """Sums over the kept positions of one call, for logging (0-dim, detached; float32, or float64
    for float64 logits).

    Sums rather than means so that they add up across steps, micro-batches and processes. A call
    whose inputs were invalid but not checked eagerly (``validate=False``) leaves NaN in
    ``num_kept``; ``check_loss_stats`` turns that into the ValueError.
    """

    nll_sum: Tensor
    """Sum of -log p_y: plain cross-entropy, comparable across regularizers."""
    target_prob_sum: Tensor
    """Sum of p_y, the model's probability of the label."""
    smoothing_entropy_sum: Tensor
    """Sum of H(u): u* for labo, log K for label_smoothing, 0 for cross_entropy (no u)."""
    num_kept: Tensor
    """Number of kept positions (labels != ignore_index); NaN if the call was invalid."""


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
    if resolved_t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature={resolved_t!r} is below {MIN_TEMPERATURE:g}: float32 cannot represent the "
            "tempered logits; at such temperatures u* is the one-hot of the top non-target class, so "
            f"temperature={MIN_TEMPERATURE:g} gives the same target"
        )
    return float(resolved_alpha), float(resolved_t)


def _flatten_inputs(
    logits: Tensor, labels: Tensor, ignore_index: int, *, check_range: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes (and the label range, a host sync, if asked); return logits (N, K), labels (N,)
    int64 and kept (N,) bool."""
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
    if check_range:
        out_of_range = kept & ((labels1d < 0) | (labels1d >= num_classes))
        if bool(out_of_range.any()):
            bad = labels1d[out_of_range][:5].tolist()
            raise ValueError(
                f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; found {bad}"
            )
    return logits2d, labels1d, kept


def labo_target(logits: Tensor, labels: Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
                ignore_index: int = -100) -> Tensor:
    """LABO's optimal smoothing distribution u* (docs/method.md, section 3), for inspection and plots.

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


def torch_fused_rows(logits: Tensor, labels: Tensor, **kwargs) -> FusedRows:
    """The chunked torch implementation's forward and backward in one call (``kernels.torch_rows``)."""
    kwargs.setdefault("chunk_elements", _CHUNK_ELEMENTS)
    return _torch_rows.fused_rows(logits, labels, **kwargs)


# ---- implementation choice and the Triton self-check -------------------------------------------

# (device, regularizer, dtype) -> whether the Triton kernels passed their first-use probe there.
_TRITON_SELF_CHECK: dict[tuple[str, str, torch.dtype], bool] = {}


def _load_triton_rows():
    from labo_hf.kernels import triton_rows

    return triton_rows


def _needs_self_check(device: torch.device) -> bool:
    """Compiled kernels are probed on first use on each GPU; the CPU interpreter is tested in CI."""
    return device.type == "cuda"


def _probe_triton(device: torch.device, dtype: torch.dtype, regularizer: str, alpha: float,
                  temperature: float | None) -> str | None:
    """Run the Triton kernels once on a small case against the torch path; the reason they fail, or None."""
    gen = torch.Generator().manual_seed(0)
    n, k = 24, 1031  # odd K: exercises the unaligned head, the vector body and the masked tail
    logits = (4 * torch.randn(n, k, generator=gen)).to(device=device, dtype=dtype)
    labels = torch.randint(0, k, (n,), generator=gen).to(device)
    labels[3] = -100
    grad_rows = torch.full((n,), 0.5, device=device)
    kw = dict(regularizer=regularizer, alpha=alpha, temperature=temperature, ignore_index=-100)
    try:
        triton_rows = _load_triton_rows()
        got = triton_rows.forward_rows(logits, labels, **kw)
        got_grad = triton_rows.backward_rows(grad_rows, logits, labels, got, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - any failure (compiler, driver, launch) means: do not use it
        return f"{type(err).__name__}: {err}"
    want = _torch_rows.forward_rows(logits, labels, **kw)
    want_grad = _torch_rows.backward_rows(grad_rows, logits, labels, want, **kw)
    for name in ("loss", "nll", "smoothing_entropy"):
        if not torch.allclose(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4):
            return f"per-row {name} differs from the torch path"
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    if not torch.allclose(got_grad.float(), want_grad.float(), rtol=tol, atol=1e-6):
        return "the gradient differs from the torch path"
    return None


def _triton_passes_self_check(device: torch.device, dtype: torch.dtype, regularizer: str, alpha: float,
                              temperature: float | None) -> bool:
    if not _needs_self_check(device):
        return True
    key = (str(device), regularizer, dtype)
    ok = _TRITON_SELF_CHECK.get(key)
    if ok is None:
        reason = _probe_triton(device, dtype, regularizer, alpha, temperature)
        ok = reason is None
        _TRITON_SELF_CHECK[key] = ok
        if not ok:
            warnings.warn(
                f"labo_hf: the Triton loss kernel failed its first-use check on {device} "
                f"({regularizer}, {dtype}): {reason}. Falling back to implementation='torch' there.",
                RuntimeWarning,
                stacklevel=2,
            )
    return ok


def _kernels_for(implementation: str, logits: Tensor, regularizer: str, alpha: float,
                 temperature: float | None):
    if implementation == "triton" and _triton_passes_self_check(
        logits.device, logits.dtype, regularizer, alpha, temperature
    ):
        return _load_triton_rows()
    return _torch_rows


def _select_implementation(implementation: str, logits: Tensor) -> str:
    """Resolve ``implementation`` to "torch" or "triton" (static checks only: no host sync)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        use = logits.is_cuda and _TRITON_INSTALLED and logits.dtype != torch.float64
        return "triton" if use else "torch"
    if implementation == "triton":
        if logits.dtype == torch.float64:
            raise ValueError(
                "implementation='triton' computes in float32; float64 logits are computed in float64 "
                "by implementation='torch' (or 'auto')"
            )
        try:
            triton_rows = _load_triton_rows()
        except ImportError as err:
            raise ValueError(
                f"implementation='triton' needs the optional dependency triton "
                f"(pip install 'labo-hf[triton]'): {err}"
            ) from err
        if not triton_rows.supports(logits):
            raise ValueError(
                f"implementation='triton' needs CUDA logits (got {logits.device}); CPU tensors only run "
                "under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )
    return implementation


# ---- the autograd op ---------------------------------------------------------------------------

_FORWARD_SCHEMA = (
    "(Tensor logits, Tensor labels, str regularizer, float alpha, float temperature, int ignore_index, "
    "str implementation, int chunk_elements) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad_rows, Tensor logits, Tensor labels, Tensor row_max, Tensor log_sum, Tensor nt_max, "
    "Tensor log_sum_t, str regularizer, float alpha, float temperature, int ignore_index, "
    "str implementation, int chunk_elements) -> Tensor"
)

_SECOND_DERIVATIVE_MESSAGE = (
    "label_regularized_loss does not support second derivatives (a backward pass through its gradient, "
    "as Hessians and gradient penalties with create_graph=True need): its backward pass is a fused kernel. "
    "labo_hf.reference.reference_label_regularized_loss computes the same loss with plain autograd and is "
    "twice differentiable (u* held constant, as in docs/method.md, section 2)."
)


def _hyper(regularizer: str, temperature: float) -> float | None:
    return temperature if regularizer == "labo" else None


@torch.library.custom_op("labo_hf::label_regularized_rows", mutates_args=(), schema=_FORWARD_SCHEMA)
def _rows_op(logits, labels, regularizer, alpha, temperature, ignore_index, implementation, chunk_elements):
    kernels = _kernels_for(implementation, logits, regularizer, alpha, _hyper(regularizer, temperature))
    kw = {"chunk_elements": chunk_elements} if kernels is _torch_rows else {}
    return tuple(kernels.forward_rows(
        logits, labels, regularizer=regularizer, alpha=alpha, temperature=_hyper(regularizer, temperature),
        ignore_index=ignore_index, **kw,
    ))


@_rows_op.register_fake
def _rows_op_fake(logits, labels, regularizer, alpha, temperature, ignore_index, implementation, chunk_elements):
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=_compute_dtype(logits.dtype)) for _ in RowStats._fields)


@torch.library.custom_op("labo_hf::label_regularized_rows_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _rows_backward_op(grad_rows, logits, labels, row_max, log_sum, nt_max, log_sum_t, regularizer, alpha,
                      temperature, ignore_index, implementation, chunk_elements):
    kernels = _kernels_for(implementation, logits, regularizer, alpha, _hyper(regularizer, temperature))
    kw = {"chunk_elements": chunk_elements} if kernels is _torch_rows else {}
    stats = RowStats(row_max, row_max, row_max, row_max, log_sum, nt_max, log_sum_t)  # loss fields unused
    return kernels.backward_rows(
        grad_rows, logits, labels, stats, regularizer=regularizer, alpha=alpha,
        temperature=_hyper(regularizer, temperature), ignore_index=ignore_index, **kw,
    )


@_rows_backward_op.register_fake
def _rows_backward_op_fake(grad_rows, logits, *args):
    return logits.new_empty(logits.shape)


def _rows_setup_context(ctx, inputs, output):
    logits, labels, *config = inputs
    _, nll, entropy, row_max, log_sum, nt_max, log_sum_t = output
    ctx.mark_non_differentiable(nll, entropy, row_max, log_sum, nt_max, log_sum_t)
    ctx.save_for_backward(logits, labels, row_max, log_sum, nt_max, log_sum_t)
    ctx.config = config


def _rows_backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * (2 + len(ctx.config))
    logits, labels, row_max, log_sum, nt_max, log_sum_t = ctx.saved_tensors
    grad = _rows_backward_op(grad_loss, logits, labels, row_max, log_sum, nt_max, log_sum_t, *ctx.config)
    return (grad,) + (None,) * (1 + len(ctx.config))


def _refuse_second_derivative(ctx, grad):
    raise RuntimeError(_SECOND_DERIVATIVE_MESSAGE)


def _backward_setup_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "labo_hf::label_regularized_rows", _rows_backward, setup_context=_rows_setup_context
)
# With create_graph=True the backward op is recorded; differentiating through it is refused here,
# at the moment it happens, instead of silently treating p - q as a constant.
torch.library.register_autograd(
    "labo_hf::label_regularized_rows_backward", _refuse_second_derivative, setup_context=_backward_setup_context
)


# ---- reduction, validation ---------------------------------------------------------------------

def _reduction_scale(num_items_in_batch: int | float | Tensor | None, kept: Tensor, dtype: torch.dtype,
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
            _check_count(count.item(), kept)
        has_kept = kept.any()
        valid = torch.isfinite(count) & ((count > 0) | ((count == 0) & ~has_kept))
        scale = torch.where(count > 0, 1.0 / count.clamp(min=torch.finfo(dtype).tiny), 1.0)
        return torch.where(valid, scale, math.nan), torch.where(valid, 0.0, math.nan)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int | float):
        raise ValueError(f"num_items_in_batch must be a number or a tensor, got {num_items_in_batch!r}")
    _check_count(num_items_in_batch, kept if validate else None)
    if num_items_in_batch == 0:
        # Without validation, kept positions with a zero count poison the call on device.
        return 1.0, torch.where(kept.any(), math.nan, 0.0).to(dtype)
    return 1.0 / num_items_in_batch, 0.0


def _check_count(value: float, kept: Tensor | None) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"num_items_in_batch must be >= 0 and finite, got {value!r}")
    if value == 0 and kept is not None and bool(kept.any()):
        raise ValueError("num_items_in_batch=0 but labels has kept positions")


def _raise_for_non_finite(logits2d: Tensor, labels: Tensor, kept: Tensor, regularizer: str) -> None:
    """Explain which input made a kept row's loss non-finite (only runs on failure)."""
    rows = logits2d[kept].to(_compute_dtype(logits2d.dtype))
    y = labels[kept]
    if torch.isnan(rows).any():
        raise ValueError("logits contain NaN at kept positions")
    if torch.isposinf(rows).any():
        raise ValueError("logits contain +inf at kept positions")
    if torch.isneginf(rows.gather(1, y.unsqueeze(1))).any():
        raise ValueError("logits are -inf at a label's class: the cross-entropy is infinite")
    if regularizer == "label_smoothing" and torch.isneginf(rows).any():
        raise ValueError(
            "logits contain -inf at kept positions: label smoothing puts mass on every class, so "
            "the loss is infinite (LABO gives masked classes no mass)"
        )
    raise ValueError(
        f"the loss overflows {str(rows.dtype).removeprefix('torch.')} for these logits (largest |logit| "
        f"{rows.abs().max().item():.3g}); float64 logits are computed in float64"
    )


_LAZY_MESSAGE = (
    "label_regularized_loss: a call since the last check had invalid inputs (labels outside [0, K) other "
    "than ignore_index, NaN or +inf logits, -inf at a label or, for label smoothing, anywhere, logits whose "
    "loss overflows, or a num_items_in_batch that is negative, zero with kept positions, or not finite). "
    "Pass validate=True to label_regularized_loss to raise at the offending call with the exact reason."
)


def check_loss_stats(stats: LossStats | Tensor | Iterable[float]) -> None:
    """Raise the ValueError of an invalid call that was not validated eagerly (``validate=False``).

    Such calls poison their statistics with NaN on the device instead of synchronising. Call this
    where a host sync happens anyway, e.g. on the running sums of ``LossStats`` fields at a logging
    step (``LABOTrainer`` does, on every process's reduced sums).
    """
    if isinstance(stats, Tensor):
        values = stats.detach().reshape(-1).tolist()
    else:
        values = [float(v) for v in stats]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(_LAZY_MESSAGE)


# ---- the public functions ----------------------------------------------------------------------

def _refuse_function_transforms(logits: Tensor) -> None:
    if torch._C._functorch.is_functorch_wrapped_tensor(logits):
        raise ValueError(
            "label_regularized_loss does not support torch.func transforms (grad, vmap, jacrev, ...) of "
            "logits: its fused kernels have no batching rule. Call it on the batch directly (it already "
            "reduces over rows), or use labo_hf.reference.reference_label_regularized_loss."
        )


class _Call(NamedTuple):
    """One call's inputs after validation: logits (N, K), labels (N,) int64, kept (N,) bool, and the rest."""

    logits2d: Tensor
    labels1d: Tensor
    kept: Tensor
    regularizer: str
    alpha: float
    temperature: float | None
    ignore_index: int
    implementation: str
    validate: bool


def _default_validate(tensor: Tensor) -> bool:
    """Whether a call on ``tensor`` validates eagerly by default."""
    # Checking needs host syncs: free on CPU, a stall per call on a GPU, a graph break under compile.
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _prepare_call(logits: Tensor, labels: Tensor, regularizer: str, alpha: float | None,
                  temperature: float | None, ignore_index: int, implementation: str,
                  validate: bool | None) -> _Call:
    alpha, temperature = resolve_hyperparameters(regularizer, alpha, temperature)
    if validate is None:
        validate = _default_validate(logits)
    if isinstance(logits, Tensor) and not torch.compiler.is_compiling():
        _refuse_function_transforms(logits)
    logits2d, labels1d, kept = _flatten_inputs(logits, labels, ignore_index, check_range=validate)
    implementation = _select_implementation(implementation, logits)
    return _Call(logits2d, labels1d, kept, regularizer, alpha, temperature, int(ignore_index), implementation,
                 bool(validate))


def _row_losses(call: _Call) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels' per-row loss, NLL and H(u), each (N,) in the compute dtype, 0 at ignored rows.

    The loss is differentiable: its backward takes any per-row upstream gradient (N,). An invalid row
    (label out of range, logits that make its loss non-finite) is NaN or inf, or with ``validate`` the
    ValueError saying why.
    """
    row_loss, nll, entropy, *_ = _rows_op(
        call.logits2d, call.labels1d, call.regularizer, call.alpha,
        call.temperature if call.temperature is not None else 1.0, call.ignore_index, call.implementation,
        int(_CHUNK_ELEMENTS),
    )
    if call.validate and not bool(torch.isfinite(row_loss).all()):
        _raise_for_non_finite(call.logits2d.detach(), call.labels1d, call.kept, call.regularizer)
    return row_loss, nll, entropy


def label_regularized_loss_per_position(
    logits: Tensor,
    labels: Tensor,
    *,
    regularizer: str = "labo",
    alpha: float | None = None,
    temperature: float | None = None,
    ignore_index: int = -100,
    implementation: str = "auto",
    validate: bool | None = None,
) -> Tensor:
    """H(q, p) of every position, unreduced, through the same kernels as ``label_regularized_loss``.

    Args:
        logits: (..., K) float32, bf16 or fp16 (computed in float32), or float64 (computed in float64).
        labels: (...) integer, in [0, K) or ``ignore_index``.
        regularizer, alpha, temperature, ignore_index, implementation, validate: as
            ``label_regularized_loss``.

    Returns:
        (...) float32 (float64 for float64 logits), 0 at ignored positions. Backward takes any upstream
        gradient g (...) (per-position weights, a loss scale) and gives ``g * (p - q)`` per position,
        computed in float32 and rounded once to the logits' dtype; nothing of size (N, K) is kept between
        the passes. Without validation an invalid position's loss is NaN or inf instead of a ValueError.
    """
    call = _prepare_call(logits, labels, regularizer, alpha, temperature, ignore_index, implementation, validate)
    row_loss, _, _ = _row_losses(call)
    return row_loss.reshape(labels.shape)


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
    validate: bool | None = None,
) -> tuple[Tensor, LossStats]:
    """``label_regularized_loss`` plus the sums needed to log it (see ``LossStats``)."""
    call = _prepare_call(logits, labels, regularizer, alpha, temperature, ignore_index, implementation, validate)
    kept = call.kept
    dtype = _compute_dtype(logits.dtype)
    scale, poison = _reduction_scale(num_items_in_batch, kept, dtype, call.validate)
    row_loss, nll, entropy = _row_losses(call)
    # The one reducer: backward hands every row the same upstream gradient, grad_output * scale.
    loss = row_loss.sum() * scale
    with torch.no_grad():
        # A non-finite row (an invalid input not checked eagerly) poisons the count.
        poison = poison + torch.where(torch.isfinite(row_loss).all(), 0.0, math.nan)
        stats = LossStats(
            nll_sum=nll.sum(),
            target_prob_sum=torch.where(kept, torch.exp(-nll), 0.0).sum(),
            smoothing_entropy_sum=entropy.sum(),
            num_kept=kept.sum().to(dtype) + poison,
        )
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
    validate: bool | None = None,
) -> Tensor:
    """Label-regularized cross-entropy H(q, p), reduced over kept positions.

    Args:
        logits: (..., K) float32, bf16 or fp16 (computed in float32), or float64 (computed in float64).
        labels: (...) integer, in [0, K) or ``ignore_index``.
        regularizer: ``"labo"``, ``"label_smoothing"`` or ``"cross_entropy"``.
        alpha: smoothing mass in [0, 1); default 0.1. Must stay None for ``"cross_entropy"``.
        temperature: LABO's T >= 1e-30; default 2.0. Must stay None unless ``"labo"``.
        ignore_index: label value of positions that are skipped entirely.
        num_items_in_batch: kept positions in the whole (accumulated, all-process) batch, as the
            Trainer supplies it; None divides by the local kept count.
        implementation: ``"auto"`` (Triton for CUDA tensors when it imports, else torch),
            ``"torch"`` (chunked, pure torch) or ``"triton"``.
        validate: check the labels' range, a tensor ``num_items_in_batch`` and the loss's finiteness
            now, with host syncs, and raise the ValueError at this call. None (default): on for CPU
            logits outside ``torch.compile``, off otherwise. Off, an invalid call returns NaN and
            leaves NaN in its ``LossStats``; ``check_loss_stats`` raises the ValueError later.

    Returns:
        0-dim loss (float32; float64 for float64 logits). Its gradient w.r.t. the logits is p - q per
        kept position divided by the denominator, computed in the backward pass in float32 and
        rounded once. An all-ignored batch gives 0 with a zero gradient.

    Raises:
        ValueError: bad shapes or hyperparameters; with ``validate``, labels out of range, a bad
            count, or logits that make the loss non-finite (NaN or +inf, -inf at the label, any -inf
            for label smoothing, float32 overflow); torch.func transforms.
        RuntimeError: from a second derivative through the loss's gradient (create_graph=True).
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
        validate=validate,
    )
    return loss
