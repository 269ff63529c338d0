"""What a model card says about the label regularizer: Hub tags, the paper, and a Markdown section.

Pure functions of (regularizer, alpha, temperature). Their one user is the Trainer subclasses'
``create_model_card`` (which ``push_to_hub`` calls too, so the Hub copy of the card keeps them); the
example scripts only pass the task and data set.
"""

from __future__ import annotations

import textwrap

__all__ = ["LABO_PAPER", "MODEL_CARD_MARKER", "TAG_NAMES", "model_card_section", "model_card_tags"]

# Heading of the section; also keeps adding it idempotent.
MODEL_CARD_MARKER = "## Label regularization (LABO)"

# Tags every card of a LABO trainer carries, whatever the regularizer (trl's `_tag_names`).
TAG_NAMES = ["labo", "label-regularization"]

# The method's paper, as trl trainers describe theirs (`_paper`).
LABO_PAPER = {
    "title": "LABO: Towards Learning Optimal Label Regularization via Bi-level Optimization",
    "id": "2305.04971",
    "citation": textwrap.dedent(
        """\
        @inproceedings{lu2023labo,
            title     = {{LABO: Towards Learning Optimal Label Regularization via Bi-level Optimization}},
            author    = {Peng Lu and Ahmad Rashid and Ivan Kobyzev and Mehdi Rezagholizadeh and Philippe Langlais},
            booktitle = {Findings of the Association for Computational Linguistics: ACL 2023},
            year      = {2023},
            eprint    = {2305.04971},
            archivePrefix = {arXiv}
        }"""
    ),
}

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
    tags = [*TAG_NAMES, f"label-regularizer-{regularizer}", f"label-regularizer-alpha-{alpha:g}"]
    if temperature is not None:
        tags.append(f"labo-temperature-{temperature:g}")
    return tags


def model_card_section(
    regularizer: str, alpha: float, temperature: float | None, paper: dict[str, str] = LABO_PAPER, cite: bool = True
) -> str:
    """Markdown section describing the regularizer, its resolved hyperparameters and (with `cite`) the paper to
    cite."""
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
    if cite:
        lines += [
            "",
            f"LABO: [{paper['title']}](https://arxiv.org/abs/{paper['id']}). Cite it as:",
            "",
            "```bibtex",
            paper["citation"],
            "```",
        ]
    return "\n".join(lines) + "\n"
