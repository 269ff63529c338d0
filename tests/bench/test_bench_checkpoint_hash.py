"""Smoke test of bench/checkpoint_hash_cost.py: its --dry_run saves a tiny model's checkpoint with and without the
content hashes and writes its result file (the numbers themselves are checked by running the bench)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))


def test_checkpoint_hash_cost_dry_run(tmp_path):
    import checkpoint_hash_cost

    record = checkpoint_hash_cost.main(["--dry_run", "--out_dir", str(tmp_path), "--dir", str(tmp_path)])
    saved = json.loads((tmp_path / "checkpoint_hash_cost_tiny.jsonl").read_text())
    assert saved["hash_cost_ratio"] == record["hash_cost_ratio"]
    assert saved["save_seconds_hashed"] > 0 and saved["save_seconds_unhashed"] > 0
    assert set(saved["hash_mb_per_s"]) == {"sha256", "blake2b"}
