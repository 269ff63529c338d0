"""The optimizer step does not depend on how the batch is split: over gradient-accumulation micro-batches
or over processes. Reference: the same SGD step computed by hand from the loss module on the whole batch.

Tolerance: the loss module computes in float32 and the parameters are float32, so the updates of two
splittings agree to float32 rounding (observed below 5e-7 of the largest update); TOL = 1e-5 leaves margin, and
each test checks that the wrong reduction (mean of per-micro-batch means) misses by far more than TOL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _torchrun import run_two_processes
from conftest import (
    IGNORE,
    LABEL_REGULARIZATION,
    LEARNING_RATE,
    TASKS,
    collate,
    flat_parameters,
    loss_kwargs,
    one_sgd_step,
    uneven_batch_examples,
)

from labo_hf.loss.functional import label_regularized_loss

TOL = 1e-5


def _logits(task_name, model, batch):
    if TASKS[task_name].seq2seq:
        return model(**batch).logits  # the model builds decoder_input_ids from the labels itself
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _reference(task_name, regularizer, micro_batches, global_count=True):
    """Hand-computed SGD update (-lr * gradient) and loss, accumulating over `micro_batches` equal chunks.

    global_count=True divides every chunk's sum by the kept count of the whole batch (the correct
    reduction); False takes the mean of per-chunk means (the reduction a GA-unaware loss would give).
    """
    model = TASKS[task_name].make_model().train()
    examples = uneven_batch_examples(task_name)
    total_kept = int((collate(examples)["labels"] != IGNORE).sum())
    size = len(examples) // micro_batches
    total_loss = 0.0
    nll_sum = 0.0
    for start in range(0, len(examples), size):
        batch = collate(examples[start:start + size])
        logits = _logits(task_name, model, batch)
        if global_count:
            loss = label_regularized_loss(logits, batch["labels"], num_items_in_batch=total_kept,
                                          **loss_kwargs(regularizer))
        else:
            loss = label_regularized_loss(logits, batch["labels"], **loss_kwargs(regularizer)) / micro_batches
        loss.backward()
        total_loss += loss.item()
        kept = batch["labels"] != IGNORE
        nll_sum += torch.nn.functional.cross_entropy(logits[kept], batch["labels"][kept], reduction="sum").item()
    grad = torch.cat([p.grad.reshape(-1).double() for p in model.parameters() if p.requires_grad])
    return -LEARNING_RATE * grad, total_loss, nll_sum / total_kept


def _assert_update(update, reference):
    scale = reference.abs().max()
    torch.testing.assert_close(update, reference, rtol=0, atol=TOL * float(scale))


@pytest.mark.parametrize("regularizer", list(LABEL_REGULARIZATION))
@pytest.mark.parametrize("task_name", ["marian", "vit"])
def test_gradient_accumulation_matches_full_batch(task_name, regularizer, tmp_path):
    start = flat_parameters(TASKS[task_name].make_model())
    reference, reference_loss, reference_nll = _reference(task_name, regularizer, micro_batches=1)
    naive, _, _ = _reference(task_name, regularizer, micro_batches=2, global_count=False)
    # The test can tell the reductions apart: averaging the two halves' means misses the reference widely.
    assert float((naive - reference).abs().max()) > 100 * TOL * float(reference.abs().max())

    for batch_size, accumulation in ((16, 1), (8, 2)):
        trainer = one_sgd_step(task_name, str(tmp_path / f"{batch_size}x{accumulation}"), batch_size, accumulation,
                               **LABEL_REGULARIZATION[regularizer])
        _assert_update(flat_parameters(trainer.model) - start, reference)
        # The logged loss and nll are those of the whole batch, not of the last micro-batch.
        (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert log["loss"] == pytest.approx(reference_loss, rel=1e-5)
        assert log["nll"] == pytest.approx(reference_nll, rel=1e-5)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, dict]:
    """`_ddp_worker.py` run once under torchrun with 2 CPU processes: its folder and result.json."""
    out = tmp_path_factory.mktemp("ddp")
    return out, run_two_processes("_ddp_worker.py", out)


def test_two_processes_match_one_process(two_process_run):
    tmp_path, result = two_process_run

    start = flat_parameters(TASKS["marian"].make_model())
    reference, reference_loss, reference_nll = _reference("marian", "labo", micro_batches=1)
    examples = uneven_batch_examples("marian")
    total_kept = int((collate(examples)["labels"] != IGNORE).sum())
    for name, micro_steps in (("bs8_ga1", 1), ("bs4_ga2", 2)):
        run = result[name]
        assert run["world_size"] == run["dist_world_size"] == run["num_processes"] == 2
        # Each process saw its own share of positions but normalized by the global count.
        seen = run["seen"]
        assert [len(per_process) for per_process in seen] == [micro_steps, micro_steps]
        assert all(call["num_items_in_batch"] == total_kept for per_process in seen for call in per_process)
        local_counts = [sum(call["local_kept"] for call in per_process) for per_process in seen]
        assert sum(local_counts) == total_kept and local_counts[0] != local_counts[1]

        update = torch.load(tmp_path / f"{name}.pt") - start
        _assert_update(update, reference)
        (log,) = run["logs"]
        assert log["loss"] == pytest.approx(reference_loss, rel=1e-5)
        assert log["nll"] == pytest.approx(reference_nll, rel=1e-5)

    # Evaluation after the step, in batches of 3 per process: 16 = 6 + 6 + 4, so the last batch repeats two
    # samples; eval_nll must count each of the 16 examples exactly once.
    trained = TASKS["marian"].make_model().eval()
    trainable = [p for p in trained.parameters() if p.requires_grad]  # the order of `flat_parameters`
    torch.nn.utils.vector_to_parameters(torch.load(tmp_path / "bs8_ga1.pt").float(), trainable)
    batch = collate(examples)
    with torch.no_grad():
        logits = trained(**batch).logits
    kept = batch["labels"] != IGNORE
    expected_nll = torch.nn.functional.cross_entropy(logits[kept], batch["labels"][kept]).item()
    assert result["bs8_ga1"]["eval_metrics"]["eval_nll"] == pytest.approx(expected_nll, rel=1e-5)


def test_two_process_eval_loss_equals_one_process_eval_loss(two_process_run, tmp_path):
    """The final evaluation batch of two processes repeats a sample; eval_loss (the default
    metric_for_best_model) must count each sample once, as with one process."""
    import _ddp_worker

    _, result = two_process_run
    two = result["vit_eval"]
    one = _ddp_worker.evaluate_vit(str(tmp_path))
    assert two["eval_nll"] == pytest.approx(one["eval_nll"], rel=1e-6)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)


def test_two_process_checkpoint_is_published_whole(two_process_run):
    from labo_hf.hf.checkpoints import MANIFEST_NAME, checkpoint_problems

    out, _ = two_process_run
    run_dir = out / "bs8_ga1"
    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoint-1"]  # no staging folder left
    manifest = json.loads((run_dir / "checkpoint-1" / MANIFEST_NAME).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= set(manifest)
    assert checkpoint_problems(str(run_dir / "checkpoint-1")) == []
