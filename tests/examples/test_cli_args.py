"""The scripts' shared argument parsing (`labo_hf.examples.cli_args`): --help opens with the script's own flags and
LABO's, before the hundreds of transformers' training flags; parsing is unchanged by that order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

import run_image_classification  # noqa: E402
import run_translation  # noqa: E402
from labo_hf.examples.cli_args import LABO_FLAGS, SCRIPT_FLAGS, TRAINING_FLAGS  # noqa: E402

LABO = ("--label_regularizer ", "--label_regularizer_alpha ", "--labo_temperature ", "--labo_fused_linear ")


def _help(script, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script.parse_arguments(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("script", "own_flags"), [
    (run_translation, ("--model_name_or_path ", "--train_prefix ", "--source_lang ", "--train_tokenizer_vocab_size ")),
    (run_image_classification, ("--model_name_or_path ", "--train_dir ", "--horizontal_flip ")),
])
def test_help_lists_script_then_labo_then_training_flags(script, own_flags, capsys):
    text = _help(script, capsys)
    lines = text.splitlines()
    # A one-line usage: the full one would list every flag before anything else.
    assert lines[0].startswith("usage: ") and len(lines[0]) < 120 and "--output_dir" not in lines[0]
    sections = [text.index(f"\n{title}:\n") for title in (SCRIPT_FLAGS, LABO_FLAGS, TRAINING_FLAGS)]
    assert sections == sorted(sections)
    script_part, labo_part, training_part = (text[a:b] for a, b in zip(sections, [*sections[1:], len(text)], strict=True))
    for flag in own_flags:
        assert f"\n  {flag}" in script_part, flag
    for flag in LABO:
        assert f"\n  {flag}" in labo_part, flag
    for flag in ("--output_dir ", "--learning_rate ", "--push_to_hub ", "--resume_from_checkpoint "):
        assert f"\n  {flag}" in training_part, flag
    # Every flag is in exactly one section, and the LABO section holds LABO's alone.
    assert labo_part.count("\n  --") == len(LABO)
    assert "\n  -h, --help" in script_part
    assert "\noptions:\n" not in text  # nothing left in argparse's catch-all group


def test_parsing_is_unchanged_by_the_help_order(tmp_path):
    model_args, data_args, args, _ = run_translation.parse_arguments([
        "--model_type", "marian", "--train_prefix", "p", "--source_lang", "de", "--target_lang", "en",
        "--do_train", "--output_dir", str(tmp_path), "--label_regularizer", "label_smoothing",
        "--label_regularizer_alpha", "0.2", "--learning_rate", "0.003",
    ])
    assert model_args.model_type == "marian" and data_args.train_prefix == "p"
    assert (args.label_regularizer, args.label_regularizer_alpha, args.learning_rate) == ("label_smoothing", 0.2,
                                                                                           0.003)
