"""Two-process CPU runs under torchrun, shared by the DDP tests (the launch) and their workers (the ending).

A worker is a script run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 WORKER OUT_DIR``;
its process 0 writes ``OUT_DIR/result.json``, which the test reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT = "result.json"


def run_two_processes(worker: str, out_dir: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``tests/<worker> out_dir *args`` with 2 CPU processes (`env` added to the environment); its result.json
    (the test fails with the output if not)."""
    import pytest

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).with_name(worker)), str(out_dir), *args],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if completed.returncode != 0:
        pytest.fail(f"torchrun failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}")
    return json.loads((Path(out_dir) / RESULT).read_text())


def write_result(out_dir: str, result: dict[str, Any]) -> None:
    """Process 0 writes the worker's result.json."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, RESULT), "w") as f:
            json.dump(result, f)


def worker_main(main: Callable[[str], None]) -> None:
    """Run ``main(OUT_DIR)`` with OUT_DIR from the command line, then end the process group."""
    import torch.distributed as dist

    main(sys.argv[1])
    # Left to interpreter shutdown, a gloo process group can abort a finished process.
    if dist.is_initialized():
        dist.destroy_process_group()
