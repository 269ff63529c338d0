"""One run, one method: the run record, the output-folder guard and the trainer's refusals
(`labo_hf.hf.run_record`, `labo_hf.examples.output_folder`, `LABOTrainer`)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import collate, common_args, image_examples, tiny_vit

from labo_hf.examples.output_folder import claim_output_dir, prepare_output_dir
from labo_hf.hf.arguments import LABOTrainingArguments
from labo_hf.hf.run_record import RUN_RECORD_NAME, read_run_record, write_run_record
from labo_hf.hf.trainers import LABOTrainer

LABO = {"label_regularizer": "labo", "label_regularizer_alpha": 0.1, "labo_temperature": 2.0,
        "model": "vit from scratch", "data": "train=/data/train"}
CE = {**LABO, "label_regularizer": "cross_entropy", "label_regularizer_alpha": 0.0, "labo_temperature": None}


def test_new_folder_gets_the_record_and_the_same_run_continues(tmp_path):
    out = str(tmp_path / "out")
    assert prepare_output_dir(out, LABO, overwrite=False, is_main_process=True) is False
    assert read_run_record(out) is None  # claimed only once training starts
    claim_output_dir(out, LABO)
    assert read_run_record(out) == LABO
    (tmp_path / "out" / "checkpoint-2").mkdir()
    assert prepare_output_dir(out, LABO, overwrite=False, is_main_process=True) is True


def test_reused_folder_with_another_regularizer_is_refused_naming_both_values(tmp_path):
    write_run_record(str(tmp_path), LABO)
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError) as error:
        prepare_output_dir(str(tmp_path), CE, overwrite=False, is_main_process=True)
    message = str(error.value)
    assert "--label_regularizer: 'cross_entropy' now, 'labo' in the recorded run" in message
    assert "--labo_temperature: None now, 2.0 in the recorded run" in message
    assert "--overwrite_output_dir" in message
    assert read_run_record(str(tmp_path)) == LABO  # nothing was changed


def test_unrelated_non_empty_folder_is_refused_and_its_readme_kept(tmp_path):
    (tmp_path / "README.md").write_text("my notes")
    (tmp_path / "all_results.json").write_text('{"eval_accuracy": 0.99}')
    with pytest.raises(ValueError, match=r"is not empty \(2 entries: README.md, all_results.json\) and holds no "
                                         r"labo-hf run record"):
        prepare_output_dir(str(tmp_path), LABO, overwrite=False, is_main_process=True)
    assert (tmp_path / "README.md").read_text() == "my notes"


def test_overwrite_output_dir_starts_clean(tmp_path):
    write_run_record(str(tmp_path), LABO, {"entries": ["checkpoint-2", "all_results.json"]})
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "all_results.json").write_text("{}")
    assert prepare_output_dir(str(tmp_path), CE, overwrite=True, is_main_process=True) is False
    assert sorted(os.listdir(tmp_path)) == []
    claim_output_dir(str(tmp_path), CE)
    assert sorted(os.listdir(tmp_path)) == [RUN_RECORD_NAME]
    assert read_run_record(str(tmp_path)) == CE


def test_overwrite_never_deletes_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current working directory"):
        prepare_output_dir(str(tmp_path), LABO, overwrite=True, is_main_process=True)
    assert (tmp_path / "keep.txt").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_before_training(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="--output_dir=.*ro.* is not writable"):
            prepare_output_dir(str(folder), LABO, overwrite=False, is_main_process=True)
    finally:
        folder.chmod(0o755)


def test_read_only_folder_fails_before_training_even_for_root(tmp_path, monkeypatch):
    # Root ignores permission bits; an unwritable filesystem is simulated where the check writes.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(ValueError, match="is not writable \\(Read-only file system\\)"):
        prepare_output_dir(str(tmp_path / "out"), LABO, overwrite=False, is_main_process=True)


def _trainer(output_dir, run_identity=None, **overrides):
    settings = {"per_device_train_batch_size": 4, "max_steps": 2, "save_strategy": "steps", "save_steps": 2}
    args = LABOTrainingArguments(**common_args(str(output_dir), **{**settings, **overrides}))
    return LABOTrainer(model=tiny_vit(), args=args, train_dataset=image_examples(8), data_collator=collate,
                       run_identity=run_identity)


def test_resuming_a_checkpoint_of_another_run_is_refused(tmp_path):
    _trainer(tmp_path, {"model": "vit from scratch"}).train()
    record = json.loads((tmp_path / "checkpoint-2" / RUN_RECORD_NAME).read_text())
    assert record["model"] == "vit from scratch" and record["label_regularizer"] == "labo"
    other = _trainer(tmp_path, max_steps=4, label_regularizer="cross_entropy")
    with pytest.raises(ValueError, match=r"checkpoint-2.* belongs to another run: --label_regularizer: "
                                         r"'cross_entropy' now, 'labo' in the recorded run"):
        other.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="model: 'resnet' now, 'vit from scratch' in the recorded run"):
        _trainer(tmp_path, {"model": "resnet"}, max_steps=4).train(resume_from_checkpoint=True)


def test_run_identity_cannot_contradict_the_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"run_identity\['label_regularizer'\]='cross_entropy' contradicts"):
        _trainer(tmp_path, {"label_regularizer": "cross_entropy"})


@pytest.mark.parametrize(("field", "value"), [("label_regularizer", "cross_entropy"),
                                              ("label_regularizer_alpha", 0.3), ("labo_temperature", 5.0)])
def test_changing_the_regularizer_after_construction_is_refused(field, value, tmp_path):
    trainer = _trainer(tmp_path)
    setattr(trainer.args, field, value)
    for call in (trainer.train, trainer.evaluate, trainer.create_model_card, trainer.save_model):
        with pytest.raises(ValueError, match=f"trainer.args.{field} was changed from .* after LABOTrainer was built"):
            call(image_examples(4)) if call == trainer.evaluate else call()


def test_all_results_json_does_not_merge_an_earlier_runs_results(tmp_path):
    (tmp_path / "all_results.json").write_text('{"eval_accuracy": 0.99, "train_loss": 0.0}')
    trainer = _trainer(tmp_path)
    trainer.save_metrics("eval", {"eval_accuracy": 0.5})
    trainer.save_metrics("predict", {"predict_accuracy": 0.4})  # this run's own results do combine
    assert json.loads((tmp_path / "all_results.json").read_text()) == {"eval_accuracy": 0.5, "predict_accuracy": 0.4}
