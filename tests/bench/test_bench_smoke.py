"""Smoke tests of the bench scripts: each runs its tiny preset for a step or two and writes its
result files. They check that the scripts run end to end and report, not the numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
DATA = DATA_DIR
sys.path.insert(0, str(BENCH))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_loss_speed_tiny(tmp_path):
    import loss_speed

    loss_speed.main(["--preset", "tiny", "--out_dir", str(tmp_path), "--repeats", "1"])
    rows = _rows(tmp_path / "loss_speed_tiny.jsonl")
    methods = {r["method"] for r in rows}
    assert {"torch_ls", "labo_torch", "ls_torch", "ce_torch"} <= methods
    base = next(r for r in rows if r["method"] == "torch_ls")
    assert base["time_ratio_vs_torch_ls"] == 1.0 and base["peak_bytes"] > 0
    assert "| 500 | labo_torch |" in (tmp_path / "loss_speed_tiny.md").read_text()


def test_step_overhead_tiny(tmp_path):
    import step_overhead

    step_overhead.main(["--preset", "tiny", "--out_dir", str(tmp_path), "--losses", "labo", "label_smoothing"])
    rows = {r["loss"]: r for r in _rows(tmp_path / "step_overhead_tiny.jsonl")}
    assert set(rows) == {"torch_ls", "labo", "label_smoothing"}
    assert all(r["step_seconds"] > 0 for r in rows.values())


def test_visualize_target_distributions():
    import torch

    from labo_hf.analysis.figures import plot_target_distributions, target_distributions

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])
    d = target_distributions(logits, 0, alpha=0.1, temperature=1.0, top_k=3)
    assert d["indices"] == [0, 4, 1]  # label first, then the model's top non-target classes
    assert d["one_hot"] == [1.0, 0.0, 0.0]
    assert d["labo"][0] == pytest.approx(0.9)
    assert sum(d["labo"]) + d["rest"]["labo"] == pytest.approx(1.0)
    # LABO at T=1 follows the model's non-target ranking; LS is flat on the non-target classes.
    assert d["labo"][1] > d["labo"][2] and d["label_smoothing"][1] == pytest.approx(d["label_smoothing"][2])
    pytest.importorskip("matplotlib")
    fig = plot_target_distributions(d, token_names=["a", "b", "c"])
    assert len(fig.axes) == 2


@pytest.mark.skipif(not (DATA / "cifar10" / "train.zip").exists(), reason="CIFAR-10 zips not available")
def test_quality_image_tiny(tmp_path):
    import quality_image

    quality_image.main(["--preset", "tiny", "--out_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"),
                        "--data_dir", str(DATA / "cifar10"), "--models", "resnet", "--regularizers",
                        "label_smoothing", "labo", "--train_size", "20", "--test_size", "20", "--max_steps", "1"])
    rows = _rows(tmp_path / "quality_image_tiny.jsonl")
    assert {r["regularizer"] for r in rows} == {"label_smoothing", "labo"}
    assert all(0 <= r["top1"] <= 100 and r["nll"] > 0 for r in rows)
    assert "Paired difference LABO - LS" in (tmp_path / "quality_image_tiny.md").read_text()


@pytest.mark.skipif(not (DATA / "multi30k" / "train.de.gz").exists(), reason="Multi30k not available")
def test_quality_translation_and_figure_tiny(tmp_path):
    import figure_targets
    import quality_translation

    quality_translation.main(["--preset", "tiny", "--out_dir", str(tmp_path), "--work_dir", str(tmp_path / "work"),
                              "--data_dir", str(DATA), "--regularizers", "labo", "--max_steps", "2"])
    rows = _rows(tmp_path / "quality_translation_tiny_deen.jsonl")
    assert len(rows) == 1 and rows[0]["regularizer"] == "labo"
    for key in ("multi30k_test2016_bleu", "iwslt14_test_chrf", "newstest2014_bleu", "test_token_nll",
                "test_token_ece"):
        assert rows[0][key] is not None
    model_dir = tmp_path / "work" / "tiny_deen" / "labo_a0.1_T2_s0"
    assert (model_dir / "config.json").exists()  # the first LABO model is kept for the figure
    out = tmp_path / "fig.png"
    figure_targets.main(["--model_dir", str(model_dir), "--data_dir", str(DATA), "--out", str(out), "--top_k", "5"])
    assert out.stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text())["indices"]


@pytest.mark.parametrize("script", ["loss_speed", "step_overhead", "quality_translation", "quality_image",
                                    "figure_targets", "efficacy_gpu", "prepare_gpu_carry"])
def test_bench_scripts_have_help(script, capsys):
    # Each bench must be runnable alone; --help must not need data, a GPU or a trained model.
    # In-process (parse_args) rather than a subprocess per script: five torch imports would cost ~15 s.
    module = __import__(script)
    with pytest.raises(SystemExit) as exc:
        module.parse_args(["--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out
