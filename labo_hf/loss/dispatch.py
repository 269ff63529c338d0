"""Which kernels run a call (torch or Triton, with Triton's first-use self-check) and the autograd op
around them, registered with ``torch.library`` so that ``torch.compile(fullgraph=True)`` traces it.

Autograd contract (docs/method.md, section 4): the forward keeps a few per-row statistics, the backward
recomputes ``p - q`` from the logits in float32 and multiplies it by the upstream gradient before rounding
once. Second derivatives through it are refused when they happen.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import Tensor

from labo_hf.kernels import RowStats
from labo_hf.kernels import torch_rows as _torch_rows
from labo_hf.kernels.torch_rows import compute_dtype as _compute_dtype
from labo_hf.loss.config import IMPLEMENTATIONS, chunk_elements

# Whether triton is installed, decided once: a lookup inside a traced function would break graphs.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# ---- implementation choice and the Triton self-check -------------------------------------------

# (device, regularizer, dtype) -> whether the Triton kernels passed their first-use probe there.
_TRITON_SELF_CHECK: dict[tuple[str, str, torch.dtype], bool] = {}


def load_triton_rows():
    """``labo_hf.kernels.triton_rows``, imported on first use (ImportError without triton)."""
    from labo_hf.kernels import triton_rows

    return triton_rows


def needs_self_check(device: torch.device) -> bool:
    """Compiled kernels are probed on first use on each GPU; the CPU interpreter is tested in CI."""
    return device.type == "cuda"


def probe_triton(device: torch.device, dtype: torch.dtype, regularizer: str, alpha: float,
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
        triton_rows = load_triton_rows()
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
    if not needs_self_check(device):
        return True
    key = (str(device), regularizer, dtype)
    ok = _TRITON_SELF_CHECK.get(key)
    if ok is None:
        reason = probe_triton(device, dtype, regularizer, alpha, temperature)
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
        return load_triton_rows()
    return _torch_rows


def select_implementation(implementation: str, logits: Tensor) -> str:
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
            triton_rows = load_triton_rows()
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
    "labo_hf.loss.reference.reference_label_regularized_loss computes the same loss with plain autograd and is "
    "twice differentiable (u* held constant, as in docs/method.md, section 2)."
)


def _kernel_temperature(regularizer: str, temperature: float) -> float | None:
    """The kernels' temperature: the op's schema carries a float for every regularizer, the kernels want None
    unless LABO."""
    return temperature if regularizer == "labo" else None


@torch.library.custom_op("labo_hf::label_regularized_rows", mutates_args=(), schema=_FORWARD_SCHEMA)
def _rows_op(logits, labels, regularizer, alpha, temperature, ignore_index, implementation, chunk_elements):
    kernels = _kernels_for(implementation, logits, regularizer, alpha, _kernel_temperature(regularizer, temperature))
    kw = {"chunk_elements": chunk_elements} if kernels is _torch_rows else {}
    return tuple(kernels.forward_rows(
        logits, labels, regularizer=regularizer, alpha=alpha, temperature=_kernel_temperature(regularizer, temperature),
        ignore_index=ignore_index, **kw,
    ))


@_rows_op.register_fake
def _rows_op_fake(logits, labels, regularizer, alpha, temperature, ignore_index, implementation, chunk_elements):
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=_compute_dtype(logits.dtype)) for _ in RowStats._fields)


@torch.library.custom_op("labo_hf::label_regularized_rows_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _rows_backward_op(grad_rows, logits, labels, row_max, log_sum, nt_max, log_sum_t, regularizer, alpha,
                      temperature, ignore_index, implementation, chunk_elements):
    kernels = _kernels_for(implementation, logits, regularizer, alpha, _kernel_temperature(regularizer, temperature))
    kw = {"chunk_elements": chunk_elements} if kernels is _torch_rows else {}
    stats = RowStats(row_max, row_max, row_max, row_max, log_sum, nt_max, log_sum_t)  # loss fields unused
    return kernels.backward_rows(
        grad_rows, logits, labels, stats, regularizer=regularizer, alpha=alpha,
        temperature=_kernel_temperature(regularizer, temperature), ignore_index=ignore_index, **kw,
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



def row_stats(logits2d: Tensor, labels1d: Tensor, regularizer: str, alpha: float, temperature: float | None,
              ignore_index: int, implementation: str) -> tuple[Tensor, Tensor, Tensor]:
    """The per-row loss (differentiable), NLL and H(u) of logits (N, K) and labels (N,) int64, each (N,)."""
    row_loss, nll, entropy, *_ = _rows_op(
        logits2d, labels1d, regularizer, alpha, temperature if temperature is not None else 1.0, ignore_index,
        implementation, chunk_elements("kernels"),
    )
    return row_loss, nll, entropy


def reset_triton_self_check() -> None:
    """Forget the Triton kernels' first-use self-check results, so that the next call probes again."""
    _TRITON_SELF_CHECK.clear()


def triton_self_check_results() -> dict[tuple[str, str, torch.dtype], bool]:
    """The first-use self-check results so far: (device, regularizer, dtype) -> whether Triton passed there."""
    return dict(_TRITON_SELF_CHECK)

