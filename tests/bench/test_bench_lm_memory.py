"""Smoke test of `bench/lm_memory.py`: the tiny preset runs each method in its own process and reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))


def test_lm_memory_tiny(tmp_path):
    import lm_memory

    lm_memory.main(["--preset", "tiny", "--out_dir", str(tmp_path), "--methods", "labo_full", "labo_fused"])
    rows = [json.loads(line) for line in (tmp_path / "lm_memory_tiny.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["labo_full", "labo_fused"]
    assert all(r["peak_bytes"] > 0 and r["step_seconds"] > 0 for r in rows)
    # Same model, batch and loss: the two paths agree on the value.
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-4
    assert "| labo_fused |" in (tmp_path / "lm_memory_tiny.md").read_text()
