"""Training arguments that select and configure the label regularizer.

`LABOTrainingArguments` and `LABOSeq2SeqTrainingArguments` add these fields to the Hugging Face
arguments (shared through `LabelRegularizationArgumentsMixin`):

- ``--label_regularizer`` (``labo`` | ``label_smoothing`` | ``cross_entropy``),
- ``--label_regularizer_alpha`` (smoothing mass; unset means the regularizer's default),
- ``--labo_temperature`` (LABO's temperature; unset means the default),
- ``--labo_fused_linear`` (causal LMs: the loss from hidden states and lm_head weight, without the logits).

The fields keep exactly what the user passed (``None`` stays ``None``) so that ``to_dict()`` and saved
``training_args.bin`` record the user's intent; the values actually used are exposed through the read-only
properties `resolved_label_regularizer_alpha` and `resolved_labo_temperature`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from labo_hf.loss.config import (
    DEFAULT_ALPHA,
    DEFAULT_TEMPERATURE,
    REGULARIZERS,
    LossConfig,
    resolve_hyperparameters,
)

__all__ = [
    "LABOSeq2SeqTrainingArguments",
    "LabelRegularization",
    "LABOTrainingArguments",
    "LabelRegularizationArgumentsMixin",
]


# Argument fields a trainer reads once, when it is built (the last one belongs to plain TrainingArguments).
LABEL_REGULARIZATION_FIELDS = ("label_regularizer", "label_regularizer_alpha", "labo_temperature",
                               "label_smoothing_factor")


class LabelRegularization(NamedTuple):
    """The label regularizer a trainer uses, with defaults filled in (for reporting)."""

    regularizer: str
    alpha: float
    temperature: float | None


def _validate_label_regularization(
    regularizer: str,
    alpha: float | None,
    temperature: float | None,
    label_smoothing_factor: float,
    owner: str | None = None,
) -> tuple[float, float | None]:
    """Validate the three LABO fields and return the resolved ``(alpha, temperature)``.

    The rules themselves live in `labo_hf.loss.config.resolve_hyperparameters` (one source of truth). This
    function only attributes a failure to the command-line flag that caused it: it resolves the
    arguments one at a time, so that an error raised while adding an argument is that argument's fault
    (``None`` is valid for alpha and temperature under every regularizer).
    """
    if label_smoothing_factor != 0:
        # transformers' LabelSmoother would be silently bypassed by the LABO trainers (they compute their own
        # loss), so refuse the combination and show the equivalent LABO setting: H(q, p) with q uniform over
        # all K classes is exactly what LabelSmoother computes.
        who = f"{owner}, which computes its own loss" if owner else "the LABO trainers, which compute their own loss"
        raise ValueError(
            f"label_smoothing_factor={label_smoothing_factor} (--label_smoothing_factor) is not used by {who}. For "
            f"conventional label smoothing use label_regularizer='label_smoothing', label_regularizer_alpha="
            f"{label_smoothing_factor} "
            "(fields of LABOTrainingArguments / LABOSeq2SeqTrainingArguments, which plain TrainingArguments lack; "
            f"CLI: --label_regularizer label_smoothing --label_regularizer_alpha {label_smoothing_factor}) and leave "
            "label_smoothing_factor at 0."
        )
    # (flag, its value, arguments to resolve): each step adds one argument to the previous, already valid, ones.
    steps = (
        ("--label_regularizer", regularizer, (regularizer, None, None)),
        ("--label_regularizer_alpha", alpha, (regularizer, alpha, None)),
        ("--labo_temperature", temperature, (regularizer, alpha, temperature)),
    )
    resolved: tuple[float, float | None] = (0.0, None)
    for flag, value, arguments in steps:
        try:
            resolved = resolve_hyperparameters(*arguments)
        except ValueError as err:
            context = "" if flag == "--label_regularizer" else f" (with --label_regularizer {regularizer})"
            raise ValueError(f"Invalid {flag}={value!r}{context}: {err}") from err
    return resolved


@dataclass
class LabelRegularizationArgumentsMixin:
    """Dataclass mixin holding the label-regularization fields shared by the LABO argument classes.

    Must come before the Hugging Face arguments class in the bases, so that its ``__post_init__`` runs
    first and then defers to the parent's.
    """

    label_regularizer: str = field(
        default="labo",
        metadata={
            "help": (
                "Training loss regularizer: 'labo' (optimal label smoothing: the smoothing mass is spread over "
                "the non-target classes by a temperature softmax of the model's own logits), "
                "'label_smoothing' (conventional uniform label smoothing) or 'cross_entropy' (no "
                "regularization)."
            ),
            "choices": list(REGULARIZERS),
        },
    )
    label_regularizer_alpha: float | None = field(
        default=None,
        metadata={
            "help": (
                "Smoothing mass alpha in [0, 1): the target keeps 1 - alpha. Defaults to "
                f"{DEFAULT_ALPHA} for 'labo' and 'label_smoothing'; must stay unset for 'cross_entropy'."
            )
        },
    )
    labo_temperature: float | None = field(
        default=None,
        metadata={
            "help": (
                "LABO temperature T > 0 of the softmax over the non-target classes (large T approaches "
                f"uniform smoothing, T = 1 follows the model's own belief). Defaults to {DEFAULT_TEMPERATURE}; "
                "only valid with --label_regularizer labo."
            )
        },
    )

    labo_fused_linear: bool = field(
        default=False,
        metadata={
            "help": (
                "Causal LMs only: compute the training loss from the final hidden states and the lm_head weight in "
                "row chunks, never building the (tokens x vocabulary) logits or their gradient. Refused for models "
                "whose logits are not a plain linear map (softcapping, logit scaling). Evaluation keeps the logits."
            )
        },
    )

    def __post_init__(self) -> None:
        # Validate before the parent's __post_init__ so that a bad flag fails fast, before any device or
        # distributed setup the parent may trigger.
        _validate_label_regularization(
            self.label_regularizer,
            self.label_regularizer_alpha,
            self.labo_temperature,
            self.label_smoothing_factor,
        )
        super().__post_init__()

    @property
    def resolved_label_regularizer_alpha(self) -> float:
        """Smoothing mass actually used (default filled in; 0.0 for ``cross_entropy``)."""
        return self._resolved_label_regularization()[0]

    @property
    def resolved_labo_temperature(self) -> float | None:
        """LABO temperature actually used (default filled in; ``None`` unless the regularizer is ``labo``)."""
        return self._resolved_label_regularization()[1]

    def _resolved_label_regularization(self) -> tuple[float, float | None]:
        # Resolved on every access rather than cached in __post_init__: the fields are plain attributes a user
        # may reassign, and a cached copy could silently disagree with them.
        return _validate_label_regularization(
            self.label_regularizer,
            self.label_regularizer_alpha,
            self.labo_temperature,
            self.label_smoothing_factor,
        )


@dataclass
class LABOTrainingArguments(LabelRegularizationArgumentsMixin, TrainingArguments):
    """`transformers.TrainingArguments` plus the label-regularization fields used by `LABOTrainer`."""


@dataclass
class LABOSeq2SeqTrainingArguments(LabelRegularizationArgumentsMixin, Seq2SeqTrainingArguments):
    """`transformers.Seq2SeqTrainingArguments` plus the label-regularization fields used by
    `LABOSeq2SeqTrainer`."""


def read_label_regularization(
    training_args: Any, owner: str, validate: bool = True
) -> tuple[LossConfig, LabelRegularization, dict[str, Any]]:
    """What a trainer named `owner` reads from its arguments once: the loss settings, the resolved values for
    reporting, and the raw argument values (to refuse later changes).

    Plain `TrainingArguments` carry no regularizer choice and mean LABO with its defaults; their
    ``label_smoothing_factor`` is refused, since honouring or ignoring it silently would both surprise.
    """
    values = {name: getattr(training_args, name) for name in LABEL_REGULARIZATION_FIELDS
              if hasattr(training_args, name)}
    if not validate:
        return None, None, values  # type: ignore[return-value]
    if isinstance(training_args, LabelRegularizationArgumentsMixin):
        regularizer = training_args.label_regularizer
        alpha, temperature = training_args.label_regularizer_alpha, training_args.labo_temperature
    else:
        regularizer, alpha, temperature = "labo", None, None
    resolved = _validate_label_regularization(
        regularizer, alpha, temperature, getattr(training_args, "label_smoothing_factor", 0.0), owner
    )
    config = LossConfig(regularizer, alpha, temperature)
    return config, LabelRegularization(regularizer, *resolved), values
