"""Smoke test of bench/readme_translation.py: the README's from-scratch translation command, cut to two steps
on a few examples, runs end to end and the driver records its scores and timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.mark.skipif(not (DATA_DIR / "multi30k").is_dir(), reason="needs Multi30k in $LABO_DATA_DIR or ../shared/data")
def test_readme_translation_dry_run(tmp_path: Path) -> None:
    import readme_translation

    record = readme_translation.main(["--dry_run", "--out_dir", str(tmp_path), "--data_dir", str(DATA_DIR)])
    saved = json.loads((tmp_path / "translation_readme_command_dry_run.jsonl").read_text())
    assert saved == record
    assert record["wall_seconds"] > 0 and record["cpu_seconds"] > 0
    assert record["first_loss_seconds"] is not None  # --logging_steps 1 in the dry run
    assert record["predict_bleu"] is not None and record["eval_bleu"] is not None
    assert "--model_type marian" in (tmp_path / "translation_readme_command_dry_run.md").read_text()
    # The run folder and its log lived in a temp folder, deleted after the run: only the two result files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["translation_readme_command_dry_run.jsonl",
                                                          "translation_readme_command_dry_run.md"]
