"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU, 2 processes with gloo, against 1 process (skipped without deepspeed).

One torchrun launch (`tests/_deepspeed_worker.py`) runs every case under both stages: `LABOTrainer` from the
logits and fused (``--labo_fused_linear``), plain `Trainer` with `labo_loss_func` (plain and fused) and with
`apply_labo` (plain and fused), `LABOSeq2SeqTrainer` on the tiny Marian, all with 2 examples per process and 2
accumulation steps; and a fused run checkpointed at step 2 and resumed by a new trainer to step 4. The reference
is `LABOTrainer` in one process without DeepSpeed, 8 examples per step.

DeepSpeed's CPU accelerator JIT-builds its shared-memory communication op with the C++ compiler on first use (about
100 s, then cached in ~/.cache/torch_extensions); the fixture builds it first and skips, with the reason, when
deepspeed does not import or the build fails.

Tolerance: float32 throughout; the observed differences are below 1e-6 of the largest update, so TOL = 1e-5.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from _loss_func_setup import KINDS, train
from _torchrun import run_two_processes
from conftest import TASKS, flat_parameters

TOL = 1e-5
STAGES = (2, 3)
LLAMA_CASES = (*KINDS, "apply_labo", "apply_labo_fused")
FUSED = {"labo_trainer_fused", "loss_func_fused", "apply_labo_fused", "uninterrupted", "resumed"}
ENV = {"DS_ACCELERATOR": "cpu"}
_BUILD = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"


def _deepspeed_unavailable() -> str | None:
    """Why DeepSpeed cannot run here, or None; builds its CPU communication op (once, cached) on the way."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install 'labo-hf[deepspeed]')"
    completed = subprocess.run([sys.executable, "-c", _BUILD], env={**os.environ, **ENV}, capture_output=True,
                               text=True, timeout=900, check=False)
    if completed.returncode != 0:
        return f"deepspeed's CPU build failed (a C++ compiler is needed):\n{completed.stderr[-2000:]}"
    return None


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    reason = _deepspeed_unavailable()
    if reason is not None:
        pytest.skip(reason)
    out_dir = tmp_path_factory.mktemp("deepspeed")
    return out_dir, run_two_processes("_deepspeed_worker.py", out_dir, *map(str, STAGES), env=ENV)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Final parameters of one process without DeepSpeed, 8 examples per step."""
    folder = tmp_path_factory.mktemp("one_process")
    return {
        "llama": flat_parameters(train("labo_trainer", "llama", str(folder / "llama"), 8, 1, 2).model),
        "marian": flat_parameters(train("labo_trainer", "marian", str(folder / "marian"), 8, 1, 2).model),
        "llama_4_steps": flat_parameters(
            train("labo_trainer_fused", "llama", str(folder / "llama4"), 8, 1, 4).model),
    }


def _assert_same_update(parameters, reference, start):
    scale = float((reference - start).abs().max())
    assert float((parameters - reference).abs().max()) <= TOL * scale


def _load(out_dir, stage, case):
    return torch.load(out_dir / f"zero{stage}-{case}.pt")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", [*LLAMA_CASES, "seq2seq", "uninterrupted", "resumed"])
def test_deepspeed_matches_one_process(deepspeed_run, references, stage, case):
    out_dir, result = deepspeed_run
    assert result["world_size"] == 2
    run = result[f"zero{stage}-{case}"]
    assert "error" not in run, run.get("error")
    assert run["deepspeed"] and run["num_processes"] == 2 and run["fused"] == (case in FUSED)
    task = "marian" if case == "seq2seq" else "llama"
    reference = references["llama_4_steps" if case in ("uninterrupted", "resumed") else task]
    _assert_same_update(_load(out_dir, stage, case), reference, flat_parameters(TASKS[task].make_model()))


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_resume_equals_the_uninterrupted_run(deepspeed_run, stage):
    out_dir, _ = deepspeed_run
    start = flat_parameters(TASKS["llama"].make_model())
    _assert_same_update(_load(out_dir, stage, "resumed"), _load(out_dir, stage, "uninterrupted"), start)
