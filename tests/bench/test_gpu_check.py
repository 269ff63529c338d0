"""bench/gpu_check.py's dry run (CPU, Triton interpreter, tiny shapes): every section of the GPU
check runs and reports, so the script is known to work before a GPU session spends time on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("triton", reason="the GPU check exercises the optional Triton kernels")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry_run", "--sweep", "--out_dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check_dry_run.jsonl").read_text().splitlines()]
    sections = {r["section"] for r in rows}
    assert sections == {"correctness", "compile", "bench", "sweep"}
    correctness = [r for r in rows if r["section"] == "correctness"]
    # 3 vocabularies x 3 dtypes x 3 regularizers x grad_output 1 and 65536, all passing.
    assert len(correctness) == 54 and all(r["passed"] for r in correctness)
    assert {r["method"] for r in rows if r["section"] == "bench"} >= {"torch_ls_bf16", "labo_triton"}
    assert "ALL CHECKS PASSED" in proc.stdout
    assert "# gpu_check (passed)" in (tmp_path / "gpu_check_dry_run.md").read_text()


def test_gpu_check_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)


def test_gpu_check_shell_script_refuses_without_cuda(tmp_path):
    """On a CPU-only machine the script stops at once with a clear message and writes no results."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr
