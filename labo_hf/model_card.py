"""What a model card says about the label regularizer: Hub tags and a Markdown section.

Pure functions of (regularizer, alpha, temperature), used by the Trainer subclasses' ``create_model_card``
(which ``push_to_hub`` calls too, so the Hub copy of the card keeps them).
"""

from __future__ import annotations

__all__ = ["MODEL_CARD_MARKER", "model_card_section", "model_card_tags"]

# Heading of the section; also keeps adding it idempotent.
MODEL_CARD_MARKER = "## Label regularization (LABO)"

_DESCRIPTIONS = {
    "labo": (
        "LABO (optimal label smoothing, Lu et al., Findings of ACL 2023): the smoothing mass alpha is spread "
        "over the non-target classes by a softmax of the model's own logits at temperature T."
    ),
    "label_smoothing": "conventional label smoothing (uniform over all classes), a LABO-project baseline.",
    "cross_entropy": "plain cross-entropy (no label regularization), a LABO-project baseline.",
}


def model_card_tags(regularizer: str, alpha: float, temperature: float | None) -> list[str]:
    """Hub tags naming the regularizer and its resolved hyperparameters, e.g. ``labo-temperature-2``."""
    tags = ["labo", "label-regularization", f"label-regularizer-{regularizer}", f"label-regularizer-alpha-{alpha:g}"]
    if temperature is not None:
        tags.append(f"labo-temperature-{temperature:g}")
    return tags


def model_card_section(regularizer: str, alpha: float, temperature: float | None) -> str:
    """Markdown section describing the regularizer and its resolved hyperparameters."""
    lines = [
        MODEL_CARD_MARKER,
        "",
        f"Trained with labo-hf; loss: {_DESCRIPTIONS[regularizer]}",
        "",
        f"- label_regularizer: {regularizer}",
        f"- label_regularizer_alpha: {alpha}",
    ]
    if temperature is not None:
        lines.append(f"- labo_temperature: {temperature}")
    return "\n".join(lines) + "\n"
