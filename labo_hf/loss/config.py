"""The loss settings: the regularizers, their defaults and the one check of their hyperparameters.

``LossConfig`` is the frozen, validated form every layer above passes around (the Trainer glue, the
modules, fused linear); ``resolve_hyperparameters`` is the check it runs once.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

from labo_hf.kernels.torch_rows import CHUNK_ELEMENTS as _KERNEL_CHUNK_ELEMENTS

REGULARIZERS = ("labo", "label_smoothing", "cross_entropy")
IMPLEMENTATIONS = ("auto", "torch", "triton")
DEFAULT_ALPHA = 0.1
DEFAULT_TEMPERATURE = 2.0
# Below this, 1 / T and the tempered logits leave float32's range (1e-39 is not even a normal
# float32), and u* is the one-hot of the top non-target class to within float32 anyway.
MIN_TEMPERATURE = 1e-30
# Logit elements per work chunk, by user: the torch kernels' work buffers, and the fused linear loss's chunk of
# logits (64 MiB in float32: the loss allocates a few buffers of this size for its own work, so a chunk's peak is a
# few hundred MiB whatever N is; fewer, larger chunks keep the matmuls efficient). Read at each call.
_CHUNK_ELEMENTS = {"kernels": _KERNEL_CHUNK_ELEMENTS, "fused_linear": 1 << 24}


def _is_number(value: object) -> bool:
    # numbers.Real covers numpy scalars (np.float32 is not a float subclass, np.float64 is); bools are not numbers
    # here, numpy's included.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


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
        if not _is_number(resolved_alpha):
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
    if not _is_number(resolved_t):
        raise ValueError(f"temperature must be a positive number, got {resolved_t!r}")
    if not (math.isfinite(float(resolved_t)) and resolved_t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {resolved_t!r}")
    if resolved_t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature={resolved_t!r} is below {MIN_TEMPERATURE:g}: float32 cannot represent the "
            "tempered logits; at such temperatures u* is the one-hot of the top non-target class, so "
            f"temperature={MIN_TEMPERATURE:g} gives the same target"
        )
    return float(resolved_alpha), float(resolved_t)


@dataclass(frozen=True)
class LossConfig:
    """A regularizer and its hyperparameters, validated once (``resolve_hyperparameters``).

    ``alpha`` and ``temperature`` hold the resolved values: alpha 0.0 for ``"cross_entropy"``,
    temperature None unless ``"labo"``. ``LossConfig(regularizer="labo")`` fills in the defaults.
    """

    regularizer: str = "labo"
    alpha: float | None = None
    temperature: float | None = None
    ignore_index: int = -100

    def __post_init__(self) -> None:
        alpha, temperature = resolve_hyperparameters(self.regularizer, self.alpha, self.temperature)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an integer, got {self.ignore_index!r}")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "temperature", temperature)

    def loss_kwargs(self) -> dict:
        """The keyword arguments of the loss functions (``regularizer``, ``alpha``, ``temperature``,
        ``ignore_index``), with cross-entropy's alpha left unset as they require."""
        return {
            "regularizer": self.regularizer,
            "alpha": None if self.regularizer == "cross_entropy" else self.alpha,
            "temperature": self.temperature,
            "ignore_index": self.ignore_index,
        }


def chunk_elements(user: str) -> int:
    """Logit elements per work chunk of ``user``: ``"kernels"`` (the torch kernels' buffers) or
    ``"fused_linear"`` (the fused linear loss's chunk of logits when no ``chunk_size`` is given)."""
    return _CHUNK_ELEMENTS[user]


@contextlib.contextmanager
def override_chunk_elements(*, kernels: int | None = None, fused_linear: int | None = None) -> Iterator[None]:
    """Within the block, work in chunks of the given number of logit elements (smaller chunks: less memory, more
    of them; tests use it to split small problems many times over). Results are the same whatever the chunks."""
    changes = {user: value for user, value in (("kernels", kernels), ("fused_linear", fused_linear))
               if value is not None}
    for user, value in changes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{user} must be a positive number of elements, got {value!r}")
    previous = dict(_CHUNK_ELEMENTS)
    _CHUNK_ELEMENTS.update(changes)
    try:
        yield
    finally:
        _CHUNK_ELEMENTS.update(previous)
