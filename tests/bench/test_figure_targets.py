"""bench/figure_targets.py writes where its docs say (the ignored outputs/ folder by default) and shows the
progress of the model it has to train first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


def test_default_output_is_the_ignored_outputs_folder():
    import figure_targets

    out = figure_targets.parse_args([]).out
    assert out == ROOT / "outputs" / "figure_targets.png"
    assert "outputs/figure_targets.png" in figure_targets.__doc__
    relative = str(out.relative_to(ROOT))
    assert subprocess.run(["git", "check-ignore", "-q", relative], cwd=ROOT).returncode == 0


def test_training_a_model_first_shows_progress(tmp_path, monkeypatch, capsys):
    import figure_targets
    import quality_translation

    def fake_train(config, args, out, progress=None):
        for line in ["loading data", "{'loss': '5.1', 'learning_rate': '0.001', 'epoch': '0.5'}",
                     "{'train_runtime': '1.0'}"]:
            progress(line + "\n")

    monkeypatch.setattr(figure_targets, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(quality_translation, "train", fake_train)
    figure_targets.find_or_train_model(figure_targets.parse_args(["--train_steps", "7"]))
    printed = capsys.readouterr().out
    assert "training one for 7 steps" in printed and "about 2 minutes" in printed
    assert "'loss': '5.1'" in printed and "train_runtime" in printed and "loading data" not in printed
