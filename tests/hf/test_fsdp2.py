"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU, 2 processes with gloo, against 1 process.

One torchrun launch (`tests/_fsdp_worker.py`) runs every case: the lm_head in the root unit, in its own unit,
with the root resharded after forward, as accelerate's FSDP2 plugin shards it (the embeddings, and the final
norm with the lm_head, as units of their own), and with tied embeddings; the loss from the logits (`LABOLoss`), from the
hidden states by hand (`FusedLinearLABOLoss`), through `labo_loss_func(fused_linear=True)` and through
`apply_labo` (plain and fused). Each process trains on its half of a batch whose halves keep very different
numbers of label positions, with the global count; the reference trains one process on the whole batch.

Tolerance: float32 throughout; the observed differences are below 4e-7 of the reference's largest update (and of
the loss), so TOL = 1e-5 leaves margin while a wrong reduction (a per-process mean) misses by far more.
"""

from __future__ import annotations

import warnings

import pytest
from _torchrun import run_two_processes

TOL = 1e-5
# Cases that cannot work, by design: the fused loss called by hand after the forward, on a weight that FSDP2
# has resharded (the lm_head as its own unit, or the root resharded), and labo_loss_func called after the
# forward when the lm_head is resharded with the root (its own call of the lm_head cannot unshard the root).
REFUSED = {"own_unit/fused_module", "root_resharded/fused_module", "root_resharded/loss_func_fused"}
SHARDINGS = ("root", "own_unit", "root_resharded", "accelerate", "tied")
KINDS = ("logits", "fused_module", "loss_func_fused", "loss_func_fused_expect", "apply_labo", "apply_labo_fused")
CASES = [f"{sharding}/{kind}" for sharding in SHARDINGS for kind in KINDS]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no torch.distributed")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)")
    return run_two_processes("_fsdp_worker.py", tmp_path_factory.mktemp("fsdp2"))


@pytest.mark.parametrize("case", [case for case in CASES if case not in REFUSED])
def test_fsdp2_matches_one_process(fsdp_run, case):
    assert fsdp_run["world_size"] == 2
    result = fsdp_run[case]
    assert "error" not in result, result.get("error")
    assert result["loss"] < TOL and result["update"] < TOL and result["parameters"] < TOL, result


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_fused_loss_on_a_resharded_weight_says_what_to_do(fsdp_run, case):
    error = fsdp_run[case]["error"]
    assert error.startswith("ValueError: ") and "is a DTensor (placements (Shard(dim=0),)" in error, error
    assert "apply_labo(model, fused_linear=True)" in error
    if case.endswith("fused_module"):  # by hand
        assert "gather the weight" in error
    else:  # labo_loss_func after the forward
        assert "loss_fn.expect(labels, num_items_in_batch) before model(...)" in error


@pytest.mark.parametrize("kind", ["logits", "apply_labo_fused"])
def test_fsdp2_bf16_mixed_precision_runs(fsdp_run, kind):
    # MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32), lm_head as its own unit: it trains, and
    # stays within bfloat16 rounding of the float32 run (observed: 0.6% of the largest update, loss 1e-3).
    result = fsdp_run[f"bf16/{kind}"]
    assert "error" not in result, result.get("error")
    assert result["loss"] < 1e-2 and result["update"] < 5e-2, result


def test_fsdp_asked_on_cpu_warns_that_ddp_runs_instead(fsdp_run):
    (message,) = fsdp_run["fsdp_asked_warnings"]
    assert "FSDP was requested" in message and "DistributedDataParallel over 2 processes" in message


def test_accelerate_fsdp_config_on_one_cpu_process_warns_once(tmp_path, monkeypatch):
    from conftest import collate, common_args, tiny_llama

    from labo_hf.hf.arguments import LABOTrainingArguments
    from labo_hf.hf.trainers import LABOTrainer

    args = LABOTrainingArguments(**common_args(str(tmp_path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LABOTrainer(model=tiny_llama(), args=args, data_collator=collate)
    assert not [w for w in caught if "FSDP" in str(w.message)]
    # What `accelerate launch` with an FSDP config sets.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LABOTrainer(model=tiny_llama(), args=args, data_collator=collate)
    (warning,) = [w for w in caught if "FSDP" in str(w.message)]
    assert "accelerate runs a single process" in str(warning.message)
