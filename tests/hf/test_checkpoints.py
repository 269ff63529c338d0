"""Checkpoints are complete or absent, and resuming uses complete ones only (`labo_hf.hf.checkpoints` and the
trainers' atomic `_save_checkpoint`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import collate, common_args, image_examples, tiny_vit
from safetensors.torch import load_file, save_file

from labo_hf.hf.arguments import LABOTrainingArguments
from labo_hf.hf.checkpoints import (
    MANIFEST_NAME,
    check_checkpoint_complete,
    find_last_complete_checkpoint,
    publish_checkpoint,
)
from labo_hf.hf.run_record import RUN_RECORD_NAME
from labo_hf.hf.trainers import LABOTrainer

WORKER = Path(__file__).resolve().parents[1] / "_crash_worker.py"


def _run_worker(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_killed_during_a_save_resumes_from_the_previous_checkpoint_bit_identically(tmp_path):
    crashed, straight = tmp_path / "crashed", tmp_path / "straight"
    killed = _run_worker(crashed, 6, 4)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL inside the save of step 4
    # The interrupted save left no checkpoint-4, only its staging folder; checkpoint-2 is intact.
    assert sorted(os.listdir(crashed)) == [".tmp-checkpoint-4", "checkpoint-2"]

    rerun = _run_worker(crashed, 6)  # the same command again
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert "Ignoring the unfinished checkpoint saves .tmp-checkpoint-4" in rerun.stderr
    straight_run = _run_worker(straight, 6)
    assert straight_run.returncode == 0, straight_run.stderr[-5000:]

    assert json.loads((crashed / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    resumed, reference = load_file(crashed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    at_step_2 = load_file(crashed / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(at_step_2[name], reference[name]) for name in reference)  # it did train on


def _train(output_dir, max_steps, eval_dataset=None, **overrides):
    args = LABOTrainingArguments(**common_args(
        str(output_dir), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, **overrides,
    ))
    trainer = LABOTrainer(model=tiny_vit(), args=args, train_dataset=image_examples(16), eval_dataset=eval_dataset,
                          data_collator=collate)
    trainer.train()
    return trainer


def test_checkpoints_carry_a_manifest_and_the_run_record_and_rotation_still_works(tmp_path):
    trainer = _train(tmp_path, 6, save_total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6"]  # rotated; no staging folder left
    manifest = json.loads((tmp_path / "checkpoint-6" / MANIFEST_NAME).read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            RUN_RECORD_NAME} <= set(manifest)
    record = json.loads((tmp_path / "checkpoint-6" / RUN_RECORD_NAME).read_text())
    assert record == {"label_regularizer": "labo", "label_regularizer_alpha": 0.1, "labo_temperature": 2.0}
    assert trainer.state.global_step == 6


def test_best_model_checkpoint_names_the_final_folder(tmp_path):
    trainer = _train(tmp_path, 4, image_examples(8, seed=3), eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                     metric_for_best_model="eval_nll", per_device_eval_batch_size=4)
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.basename(best).startswith("checkpoint-") and os.path.isdir(best)
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] in (str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4"))


def test_resume_skips_incomplete_checkpoints_and_names_them(tmp_path, caplog):
    _train(tmp_path, 6)
    # A damaged newest checkpoint (a truncated file) and one without its trainer state, as disk trouble or an
    # older non-atomic save leaves them.
    weights = tmp_path / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    assert find_last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with caplog.at_level("WARNING"):
        find_last_complete_checkpoint(str(tmp_path))
    assert "checkpoint-6 (missing or damaged: model.safetensors (truncated" in caplog.text
    assert "checkpoint-4 (missing or damaged: trainer_state.json)" in caplog.text

    with pytest.raises(ValueError, match=r"--resume_from_checkpoint=.*checkpoint-4.* not a complete checkpoint.*"
                                         r"trainer_state\.json"):
        check_checkpoint_complete(str(tmp_path / "checkpoint-4"))
    # The trainer refuses it too, and resume_from_checkpoint=True takes checkpoint-2.
    args = LABOTrainingArguments(**common_args(str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                                               save_strategy="no"))
    trainer = LABOTrainer(model=tiny_vit(), args=args, train_dataset=image_examples(16), data_collator=collate)
    with pytest.raises(ValueError, match="missing or damaged: trainer_state.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6


def test_checkpoints_of_plain_transformers_still_resume(tmp_path):
    # No manifest: complete when the trainer state and weights are there.
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, tmp_path / "checkpoint-3" / "model.safetensors")
    assert find_last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="model weights"):
        check_checkpoint_complete(str(tmp_path / "checkpoint-5"))
    assert find_last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")


def test_publishing_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    final = tmp_path / "checkpoint-2"
    final.mkdir()
    (final / "old-only.bin").write_bytes(b"old")
    staged = tmp_path / ".tmp-checkpoint-2" / "checkpoint-2"
    staged.mkdir(parents=True)
    (staged / "trainer_state.json").write_text("{}")
    (staged / "model.safetensors").write_bytes(b"weights")
    publish_checkpoint(str(staged), str(final))
    assert sorted(os.listdir(final)) == [MANIFEST_NAME, "model.safetensors", "trainer_state.json"]
    assert sorted(os.listdir(tmp_path)) == [".tmp-checkpoint-2", "checkpoint-2"]  # the caller removes the root
    assert check_checkpoint_complete(str(final)) is None


def _finished_run_trainer(output_dir, **length):
    args = LABOTrainingArguments(**common_args(
        str(output_dir), per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps", save_steps=2,
        logging_steps=1, **length,
    ))
    return LABOTrainer(model=tiny_vit(), args=args, train_dataset=image_examples(16), data_collator=collate)


# 16 examples in batches of 4: 4 steps per epoch. Step 3 and epoch 1.5 (step 6) end inside an epoch, where
# transformers 5.25 alone trains one more step on resume; epoch 1 (step 4) ends at an epoch boundary, where it
# trains none but reports train_loss 0.0.
@pytest.mark.parametrize("length", [{"max_steps": 3}, {"num_train_epochs": 1.5}, {"num_train_epochs": 1}],
                         ids=["max_steps", "mid_epoch", "epoch_boundary"])
def test_rerunning_a_finished_run_trains_nothing(tmp_path, caplog, length):
    first = _finished_run_trainer(tmp_path, **length)
    first.train()
    final_step = first.state.global_step
    checkpoints = sorted(os.listdir(tmp_path))
    assert f"checkpoint-{final_step}" in checkpoints
    trained = {name: p.detach().clone() for name, p in first.model.named_parameters()}

    rerun = _finished_run_trainer(tmp_path, **length)  # the same command again, from a fresh model
    with caplog.at_level("WARNING"):
        output = rerun.train(resume_from_checkpoint=True)
    assert f"is the end of this run (step {final_step} of {final_step})" in caplog.text
    assert rerun.resumed_complete_run and rerun.state.global_step == final_step
    assert sorted(os.listdir(tmp_path)) == checkpoints  # no checkpoint-(N+1), nothing rewritten beside
    for name, p in rerun.model.named_parameters():
        assert torch.equal(p, trained[name]), name
    # Nothing claims a training loss for a call that trained no step.
    assert "train_loss" not in output.metrics and math.isnan(output.training_loss)
    assert "train_loss" not in rerun.state.log_history[-1]
    assert output.metrics["train_steps_per_second"] == 0


def test_resuming_past_the_end_of_a_shorter_run_is_refused(tmp_path):
    _finished_run_trainer(tmp_path, max_steps=4).train()
    shorter = _finished_run_trainer(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"checkpoint-4.* at step 4 of a run of 4 steps, past the end of this run "
                                         r"of 2 steps \(max_steps=2"):
        shorter.train(resume_from_checkpoint=True)
    # A longer run continues from it, as before.
    longer = _finished_run_trainer(tmp_path, max_steps=5)
    longer.train(resume_from_checkpoint=True)
    assert longer.state.global_step == 5 and not longer.resumed_complete_run
