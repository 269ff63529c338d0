"""The model card: what `labo_hf.hf.model_card` says about the regularizer, and the card the trainers write."""

from __future__ import annotations

import pytest
from conftest import TASKS, collate, common_args

from labo_hf.hf.arguments import LABOTrainingArguments
from labo_hf.hf.model_card import (
    LABO_PAPER,
    MODEL_CARD_MARKER,
    TAG_NAMES,
    model_card_section,
    model_card_tags,
)
from labo_hf.hf.trainers import LABOTrainer


@pytest.mark.parametrize(
    ("regularizer", "alpha", "temperature", "expected"),
    [
        ("labo", 0.1, 2.0, ["label-regularizer-labo", "label-regularizer-alpha-0.1", "labo-temperature-2"]),
        ("label_smoothing", 0.25, None, ["label-regularizer-label_smoothing", "label-regularizer-alpha-0.25"]),
        ("cross_entropy", 0.0, None, ["label-regularizer-cross_entropy", "label-regularizer-alpha-0"]),
    ],
)
def test_tags_name_the_regularizer_and_its_resolved_values(regularizer, alpha, temperature, expected):
    assert model_card_tags(regularizer, alpha, temperature) == [*TAG_NAMES, *expected]


def test_section_lists_the_values_and_cites_the_paper_once():
    section = model_card_section("labo", 0.2, 1.5)
    assert section.startswith(MODEL_CARD_MARKER + "\n")
    assert "- label_regularizer: labo\n- label_regularizer_alpha: 0.2\n- labo_temperature: 1.5\n" in section
    assert f"https://arxiv.org/abs/{LABO_PAPER['id']}" in section
    assert section.count("@inproceedings{lu2023labo,") == 1
    # Baselines say what they are, carry no temperature, and a template that cites the paper itself (trl's) can
    # leave the citation out.
    baseline = model_card_section("label_smoothing", 0.1, None, cite=False)
    assert "uniform over all classes" in baseline and "labo_temperature" not in baseline
    assert "@inproceedings" not in baseline and "arxiv.org" not in baseline


def test_model_card_names_the_regularizer_and_its_hyperparameters(tmp_path):
    args = LABOTrainingArguments(**common_args(str(tmp_path)), label_regularizer_alpha=0.2, labo_temperature=1.5)
    model = TASKS["vit"].make_model()
    trainer = LABOTrainer(model=model, args=args, data_collator=collate)
    trainer.create_model_card(tags=["my-tag"], dataset="toy")
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    for tag in ["my-tag", "labo", "label-regularizer-labo", "label-regularizer-alpha-0.2", "labo-temperature-1.5"]:
        assert f"- {tag}\n" in card
    assert "This model was trained from scratch on the toy dataset." in card
    assert "## Label regularization (LABO)" in card
    assert "- label_regularizer_alpha: 0.2\n- labo_temperature: 1.5\n" in card
    # The paper, trl-style: linked and cited in BibTeX.
    assert "https://arxiv.org/abs/2305.04971" in card and "@inproceedings{lu2023labo," in card
    assert model.config._name_or_path == ""  # only borrowed while the card was written
    # push_to_hub regenerates the card through create_model_card: the section is written once.
    trainer.create_model_card(dataset="toy")
    assert (tmp_path / "README.md").read_text(encoding="utf-8").count("## Label regularization (LABO)") == 1
