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

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .losses import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, REGULARIZERS, resolve_hyperparameters

__all__ = [
    "LABOSeq2SeqTrainingArguments",
    "LABOTrainingArguments",
    "LabelRegularizationArgumentsMixin",
]


def _validate_label_regularization(
    regularizer: str,
    alpha: float | None,
    temperature: float | None,
    label_smoothing_factor: float,
) -> tuple[float, float | None]:
    """Validate the three LABO fields and return the resolved ``(alpha, temperature)``.

    The rules themselves live in `labo_hf.losses.resolve_hyperparameters` (one source of truth). This
    function only attributes a failure to the command-line flag that caused it: it resolves the
    arguments one at a time, so that an error raised while adding an argument is that argument's fault
    (``None`` is valid for alpha and temperature under every regularizer).
    """
    if label_smoothing_factor != 0:
        # transformers' LabelSmoother would be silently bypassed by the LABO trainers (they compute their own
        # loss), so refuse the combination and show the equivalent LABO setting: H(q, p) with q uniform over
        # all K classes is exactly what LabelSmoother computes.
        raise ValueError(
            f"--label_smoothing_factor={label_smoothing_factor} cannot be combined with --label_regularizer: "
            "the LABO trainers compute the loss themselves. For conventional label smoothing use "
            f"`--label_regularizer label_smoothing --label_regularizer_alpha {label_smoothing_factor}` "
            "and leave --label_smoothing_factor at 0."
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
