"""bench/efficacy_gpu.py: the dry run (tiny models, CPU, 2 runs at once) end to end, the budget planner,
and the batched ECE the worker uses against labo_hf.analysis.metrics' definition."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("LABO_DATA_DIR", str(ROOT.parent / "shared" / "data")))
sys.path.insert(0, str(ROOT / "bench"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("task,needed", [("translation", "multi30k/train.de.gz"), ("image", "cifar10/train.zip")])
def test_dry_run_writes_paired_results(task, needed, tmp_path):
    if not (DATA / needed).exists():
        pytest.skip(f"{DATA / needed} not available (set $LABO_DATA_DIR or put the data in ../shared/data)")
    import efficacy_gpu

    efficacy_gpu.main(["--task", task, "--dry_run", "--data_dir", str(DATA), "--out_dir", str(tmp_path),
                       "--work_dir", str(tmp_path / "work")])
    rows = _rows(tmp_path / f"efficacy_gpu_{task}_dryrun.jsonl")
    # The budget keeps whole LS/LABO pairs, highest-priority alpha first.
    assert {(r["regularizer"], r["alpha"]) for r in rows} == {("label_smoothing", 0.2), ("labo", 0.2)}
    # On a loaded machine a run can reach the budget before its 2 steps: it must then say so.
    assert len(rows) == 4 and all(r["steps"] == 2 or r["truncated"] for r in rows)
    key = "multi30k_test2016_bleu" if task == "translation" else "top1"
    assert all(r[key] is not None and r["train_seconds"] > 0 for r in rows)
    md = (tmp_path / f"efficacy_gpu_{task}_dryrun.md").read_text()
    assert "Paired difference LABO - LS" in md and "data preparation" in md
    assert "labo_a0.1_T4_s2" in md  # what the budget cut is named


def test_plan_keeps_pairs_and_fits_budget():
    import efficacy_gpu

    args = efficacy_gpu.parse_args(["--task", "translation"])
    est = efficacy_gpu.estimate(args)
    units = efficacy_gpu.grid_units(args)
    assert sum(map(len, units)) == 27  # CE + LS/LABO x 3 alphas + LABO T1/T4, x 3 seeds
    kept, cut = efficacy_gpu.plan(units, 400, 0, est)
    assert efficacy_gpu.wall_time(len(kept), 0, est) <= 400 < efficacy_gpu.wall_time(len(kept) + 2, 0, est)
    labo = {(c["alpha"], c["seed"]) for c in kept if c["regularizer"] == "labo" and c["temperature"] == 2.0}
    ls = {(c["alpha"], c["seed"]) for c in kept if c["regularizer"] == "label_smoothing"}
    assert labo == ls and len(kept) + len(cut) == 27
    with pytest.raises(ValueError, match="--budget_s"):
        efficacy_gpu.parse_args(["--task", "image", "--budget_s", "-1"])


def test_binned_calibration_matches_library_ece():
    import torch
    from efficacy_worker import binned_calibration, calibration_from_bins

    from labo_hf.analysis.metrics import expected_calibration_error, negative_log_likelihood

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 50, generator=g) * 3
    labels = torch.randint(0, 50, (3, 40), generator=g)
    labels[:, -5:] = -100
    stats = None
    for i in range(3):  # batch by batch, as the worker does
        stats = binned_calibration(stats, logits[i], labels[i])
    got = calibration_from_bins(stats)
    flat, y = logits.reshape(-1, 50), labels.reshape(-1)
    assert got["ece"] == pytest.approx(expected_calibration_error(flat, y), abs=1e-6)
    assert got["nll"] == pytest.approx(negative_log_likelihood(flat, y), abs=1e-5)
    assert got["tokens"] == 3 * 35


def test_late_runs_shed_lowest_priority_pairs(tmp_path):
    import time

    import efficacy_gpu

    class FakeProc:
        killed = False

        def kill(self):
            self.killed = True

    alive, first_seen, now = {}, {}, time.time()
    for alpha in (0.2, 0.3):
        for reg, t in (("label_smoothing", None), ("labo", 2.0)):
            spec = {"regularizer": reg, "alpha": alpha, "temperature": t, "seed": 0}
            name = efficacy_gpu.run_name(spec)
            spec["result_path"] = str(tmp_path / f"{name}.json")
            (tmp_path / f"{name}.progress").write_text(json.dumps({"step": 10, "max_steps": 100}))
            alive[name] = (spec, FakeProc())
            first_seen[name] = (now - 40, 0)  # 0.25 steps/s: 360 s to go
    assert efficacy_gpu._shed_if_late(alive, now + 400, first_seen) == []
    msgs = efficacy_gpu._shed_if_late(alive, now + 180, first_seen)
    killed = {name for name, (_, proc) in alive.items() if proc.killed}
    assert killed == {"label_smoothing_a0.3_s0", "labo_a0.3_T2_s0"} and len(msgs) == 2
