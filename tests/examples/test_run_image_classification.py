"""End-to-end tests of run_image_classification.py (offline, CPU, tiny ViTs trained from scratch).

The learnable data set is written by the tests: 8x8 PNGs of three colors with noise, 12 training and 5
validation images per class (15 validation images: an odd count, so that two processes with batches of 4
must pad the last evaluation round with duplicates).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from labo_hf.analysis.metrics import accuracy, expected_calibration_error, negative_log_likelihood

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "run_image_classification.py"
sys.path.insert(0, str(REPO_ROOT))

import run_image_classification as script  # noqa: E402

CLASSES = {"blue": (30, 60, 220), "green": (40, 200, 50), "red": (220, 40, 40)}  # sorted names = label ids
TRAIN_PER_CLASS, VALIDATION_PER_CLASS = 12, 5
# A ViT of one layer, hidden size 16, on the 8x8 images; lr and epochs tuned to learn the colors reliably.
TINY_VIT = [
    "--model_type", "vit",
    "--config_overrides",
    "image_size=8,patch_size=4,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
    "--seed", "0", "--disable_tqdm", "true", "--report_to", "none",
]


def _write_images(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, color in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-40, 41, size=(8, 8, 3))
            pixels = np.clip(np.asarray(color) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")


def _zip(folder: Path, archive: Path, prefix: str) -> None:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*.png")):
            z.write(path, prefix + path.relative_to(folder).as_posix())


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colors")
    _write_images(root / "train", TRAIN_PER_CLASS, seed=0)
    _write_images(root / "validation", VALIDATION_PER_CLASS, seed=1)
    # Both zip layouts: <split>/<class>/<image> for train, <class>/<image> for validation.
    _zip(root / "train", root / "train.zip", prefix="train/")
    _zip(root / "validation", root / "validation.zip", prefix="")
    return {
        "train": root / "train",
        "validation": root / "validation",
        "train_zip": root / "train.zip",
        "validation_zip": root / "validation.zip",
    }


def run_main(monkeypatch, *args: str) -> dict:
    """Run the script's main() with a patched sys.argv; return OUTPUT_DIR/all_results.json."""
    monkeypatch.setattr(sys, "argv", ["run_image_classification.py", *args])
    script.main()
    output_dir = Path(args[args.index("--output_dir") + 1])
    return json.loads((output_dir / "all_results.json").read_text())


def _validation_images(folder: Path) -> tuple[list[Image.Image], np.ndarray]:
    names = sorted(CLASSES)
    paths = sorted(folder.rglob("*.png"))
    images = [Image.open(path).convert("RGB") for path in paths]
    return images, np.array([names.index(path.parent.name) for path in paths])


@pytest.fixture(scope="module")
def folder_run(image_data, tmp_path_factory) -> tuple[Path, dict]:
    """One training run on the image folders, shared by the tests that inspect its outputs."""
    output_dir = tmp_path_factory.mktemp("folder_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        results = run_main(
            monkeypatch, "--output_dir", str(output_dir),
            "--train_dir", str(image_data["train"]), "--validation_dir", str(image_data["validation"]),
            "--test_dir", str(image_data["validation"]), "--do_train", "--do_eval", "--do_predict",
            "--num_train_epochs", "8", "--learning_rate", "3e-3", *TINY_VIT,
        )
    return output_dir, results


def test_image_folder_run_learns_and_reports_metrics(folder_run):
    _, results = folder_run
    for key in ("eval_accuracy", "eval_nll", "eval_ece", "eval_loss"):
        assert math.isfinite(results[key]), key
    assert 0.0 <= results["eval_ece"] <= 1.0
    # Three well-separated colors: the tiny ViT gets them all right (chance is 1/3).
    assert results["eval_accuracy"] == 1.0
    assert results["predict_accuracy"] == 1.0
    assert results["eval_num_examples"] == 15 and results["eval_samples"] == 15
    assert results["train_samples"] == 36
    # 36 images / batch 8 = 5 steps per epoch, 8 epochs.
    assert results["epoch"] == 8.0
    # 3 classes: no top-5 accuracy.
    assert "eval_top5_accuracy" not in results


def test_saved_model_reloads_with_auto_classes(folder_run, image_data):
    output_dir, results = folder_run
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}
    images, labels = _validation_images(image_data["validation"])
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    # The script's evaluation used the same weights and preprocessing: same NLL, same predictions.
    assert negative_log_likelihood(logits, labels) == pytest.approx(results["eval_nll"], rel=1e-5)
    assert negative_log_likelihood(logits, labels) == pytest.approx(results["predict_nll"], rel=1e-5)
    lines = (output_dir / "predict_results.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    predicted = [line.split("\t")[1] for line in lines[1:]]
    assert predicted == [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


def test_model_card_names_labo(folder_run):
    output_dir, _ = folder_run
    card = (output_dir / "README.md").read_text()
    assert "## Label regularization (LABO)" in card
    assert "- label_regularizer: labo" in card
    assert "- label_regularizer_alpha: 0.1" in card
    assert "- labo_temperature: 2.0" in card
    assert "- labo\n" in card  # tag in the YAML header
    assert "image-classification" in card
    assert "This model was trained from scratch on the train dataset." in card
    # The model-index holds the run's results (transformers drops them for a data set without Hub tags), and no
    # `datasets:` metadata names a Hub data set that does not exist.
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.datasets is None
    [result] = data.eval_results
    assert (result.task_type, result.dataset_name, result.metric_type) == ("image-classification", "train", "accuracy")
    assert result.metric_value == json.loads((output_dir / "eval_results.json").read_text())["eval_accuracy"]


def test_fine_tune_from_local_checkpoint_folder(folder_run, image_data, tmp_path, monkeypatch):
    # --model_name_or_path with a local folder (the run above): config, weights and image processor come
    # from it, and the from-scratch training defaults do not apply (transformers' lr 5e-5).
    checkpoint_dir, _ = folder_run
    results = run_main(
        monkeypatch, "--output_dir", str(tmp_path), "--model_name_or_path", str(checkpoint_dir),
        "--train_dir", str(image_data["train"]), "--validation_dir", str(image_data["validation"]),
        "--max_steps", "2", "--logging_steps", "1", "--label_regularizer", "label_smoothing",
        "--per_device_train_batch_size", "8",
        "--disable_tqdm", "true",
    )
    assert results["eval_accuracy"] == 1.0 and results["eval_num_examples"] == 15
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    # transformers' linear decay from 5e-5 over 2 steps, no warmup (not the script's 1e-3 cosine).
    learning_rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert learning_rates == pytest.approx([5e-5, 2.5e-5])
    card = (tmp_path / "README.md").read_text()
    assert "- label_regularizer: label_smoothing" in card and "labo_temperature" not in card
    assert f"fine-tuned version of [{checkpoint_dir}]" in card


def test_predict_only_on_a_test_folder_with_a_trained_model(folder_run, image_data, tmp_path, monkeypatch):
    checkpoint_dir, folder_results = folder_run
    results = run_main(
        monkeypatch, "--output_dir", str(tmp_path), "--model_name_or_path", str(checkpoint_dir),
        "--test_dir", str(image_data["validation_zip"]), "--do_predict", "--disable_tqdm", "true",
    )
    assert results["predict_nll"] == pytest.approx(folder_results["predict_nll"], rel=1e-6)
    assert results["predict_samples"] == 15 and "train_samples" not in results


def test_eval_only_refuses_a_checkpoint_with_other_classes(folder_run, tmp_path, monkeypatch):
    checkpoint_dir, _ = folder_run
    # The digits (classes "0".."9") against a head trained on blue/green/red.
    with pytest.raises(ValueError, match=r"differ from those the checkpoint predicts \(\['blue', 'green', 'red'\]\)"):
        run_main(monkeypatch, "--output_dir", str(tmp_path), "--model_name_or_path", str(checkpoint_dir), "--do_eval")


def test_zipped_folders_give_the_same_run(folder_run, image_data, tmp_path, monkeypatch):
    _, folder_results = folder_run
    results = run_main(
        monkeypatch, "--output_dir", str(tmp_path),
        "--train_dir", str(image_data["train_zip"]), "--validation_dir", str(image_data["validation_zip"]),
        "--test_dir", str(image_data["validation_zip"]), "--do_train", "--do_eval", "--do_predict",
        "--num_train_epochs", "8", "--learning_rate", "3e-3", *TINY_VIT,
    )
    # Same images in the same order, same labels, same seeds: the same run, to the last bit.
    for key in ("eval_accuracy", "eval_nll", "eval_ece", "eval_loss", "train_loss"):
        assert results[key] == folder_results[key], key
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"] == {"0": "blue", "1": "green", "2": "red"}


def test_dataset_name_local_folder_with_held_out_validation(image_data, tmp_path, monkeypatch):
    # load_dataset() on a local <class>/<image> folder: one train split; 15% of it (stratified) is held
    # out for evaluation since there is no validation split.
    results = run_main(
        monkeypatch, "--output_dir", str(tmp_path / "out"), "--dataset_name", str(image_data["train"]),
        "--cache_dir", str(tmp_path / "cache"), "--max_steps", "2", *TINY_VIT,
    )
    assert results["train_samples"] == 30 and results["eval_samples"] == 6
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "blue", "1": "green", "2": "red"}
    # A local folder is no Hub dataset: the card's metadata must not list its path.
    assert str(image_data["train"]) not in (tmp_path / "out" / "README.md").read_text().split("---")[1]


def test_dataset_tags_of_hub_datasets_reach_the_card(monkeypatch):
    from labo_hf.examples import runtime as examples

    cards = []

    class FakeTrainer:
        args = type("Args", (), {"do_train": False, "do_eval": False, "do_predict": False, "push_to_hub": False})

        def create_model_card(self, **card):
            cards.append(card)

    examples.train_evaluate_predict(FakeTrainer(), checkpoint=None, model_card={"dataset_tags": "cifar10"})
    assert cards == [{"dataset_tags": "cifar10"}]


def test_plain_labels_get_one_mapping_across_splits():
    from datasets import Dataset, DatasetDict

    raw = DatasetDict(
        {
            "train": Dataset.from_dict({"label": ["cat", "dog", "cat", "eel"]}),
            "validation": Dataset.from_dict({"label": ["eel", "eel"]}),  # no cat, no dog
        }
    )
    encoded = script._encode_labels(raw, "label")
    assert encoded["train"].features["label"].names == ["cat", "dog", "eel"]
    assert encoded["train"]["label"] == [0, 1, 0, 2]
    assert encoded["validation"]["label"] == [2, 2]
    ints = script._encode_labels(DatasetDict({"train": Dataset.from_dict({"label": [10, 2, 10]})}), "label")
    assert ints["train"].features["label"].names == ["2", "10"] and ints["train"]["label"] == [1, 0, 1]


def test_augmentation_is_per_example_and_per_epoch_also_in_persistent_workers():
    augmentation = script.RandomCropFlip(padding=2, horizontal_flip=True, fill=np.zeros(3), seed=0)
    image = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.from_numpy(augmentation(image, index))

    expected = {}
    for epoch in (0, 1):
        augmentation.epoch = epoch
        expected[epoch] = torch.stack([Images()[i] for i in range(4)])
    # Same seed, epoch and index: same crop; another epoch: other crops.
    assert not torch.equal(expected[0], expected[1])
    loader = torch.utils.data.DataLoader(Images(), batch_size=4, num_workers=1, persistent_workers=True)
    for epoch in (0, 1):
        augmentation.epoch = epoch  # set in the main process, read by the (persistent) worker
        assert torch.equal(next(iter(loader)), expected[epoch])


def test_digits_default_few_steps(tmp_path, monkeypatch):
    results = run_main(monkeypatch, "--output_dir", str(tmp_path), "--max_steps", "3", "--disable_tqdm", "true")
    # Train and eval are on by default; stratified 80/20 split of the 1,797 digits.
    assert results["train_samples"] == 1437
    assert results["eval_samples"] == 360 and results["eval_num_examples"] == 360
    for key in ("eval_accuracy", "eval_nll", "eval_ece"):
        assert math.isfinite(results[key]), key
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in script.SMALL_VIT_CONFIG.items():
        assert config[key] == value, key
    assert config["id2label"] == {str(d): str(d) for d in range(10)}
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 16, "width": 16}

    # The same command again (the README's quick start, rerun): the finished run is recognized, although the
    # default saves no intermediate checkpoint; nothing is trained, the model and its train results are kept.
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    weights = (tmp_path / "model.safetensors").read_bytes()
    again = run_main(monkeypatch, "--output_dir", str(tmp_path), "--max_steps", "3", "--disable_tqdm", "true")
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert again["train_loss"] == results["train_loss"] and again["eval_accuracy"] == results["eval_accuracy"]
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 3


def test_digits_split_is_fixed_and_stratified():
    dataset = script.load_digits_dataset()
    assert (len(dataset["train"]), len(dataset["validation"])) == (1437, 360)
    counts = np.bincount(dataset["validation"]["label"], minlength=10)
    # 20% of each class, rounded (the classes have 178, 182, 177, 183, 181, 182, 181, 179, 174, 180 images).
    assert counts.tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert dataset["train"][0]["image"].size == (8, 8)
    again = script.load_digits_dataset()
    assert again["validation"]["label"] == dataset["validation"]["label"]


def test_resume_matches_uninterrupted_run(image_data, tmp_path, monkeypatch):
    # Constant learning rate: a 4-step run is then exactly the first half of an 8-step run (a decaying
    # schedule would depend on max_steps). Augmentation (random crop + flip) is on: it must be seeded per
    # example for the resumed steps to see the same images. 5 steps per epoch: the resumed part crosses
    # an epoch boundary.
    common = [
        "--train_dir", str(image_data["train"]), "--do_train",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--learning_rate", "3e-3",
        "--save_strategy", "steps", "--save_steps", "4", *TINY_VIT,
    ]
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    run_main(monkeypatch, "--output_dir", str(interrupted), "--max_steps", "4", *common)
    assert (interrupted / "checkpoint-4").is_dir()
    # Same output_dir: the checkpoint is detected and resumed from.
    run_main(monkeypatch, "--output_dir", str(interrupted), "--max_steps", "8", *common)
    run_main(monkeypatch, "--output_dir", str(straight), "--max_steps", "8", *common)
    resumed_state = json.loads((interrupted / "trainer_state.json").read_text())
    assert resumed_state["global_step"] == 8
    resumed = load_file(interrupted / "model.safetensors")
    uninterrupted = load_file(straight / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6, msg=name)
    # And it did train: the parameters moved away from the 4-step checkpoint.
    checkpoint = load_file(interrupted / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(checkpoint[name], resumed[name]) for name in resumed)

    # The same command once more on the finished run trains nothing: no checkpoint-9, the same weights, and the
    # run's train results (its train_loss) kept rather than replaced by those of a call that trained no step.
    finished = sorted(path.name for path in straight.iterdir())
    train_results = (straight / "train_results.json").read_text()
    run_main(monkeypatch, "--output_dir", str(straight), "--max_steps", "8", *common)
    assert sorted(path.name for path in straight.iterdir()) == finished
    rerun = load_file(straight / "model.safetensors")
    assert all(torch.equal(rerun[name], uninterrupted[name]) for name in uninterrupted)
    assert (straight / "train_results.json").read_text() == train_results
    assert json.loads((straight / "all_results.json").read_text())["train_loss"] > 0


def test_explicit_resume_from_checkpoint_must_exist(tmp_path, monkeypatch, image_data):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ValueError, match="--resume_from_checkpoint"):
        run_main(
            monkeypatch, "--output_dir", str(tmp_path / "out"), "--train_dir", str(image_data["train"]),
            "--resume_from_checkpoint", str(missing), *TINY_VIT,
        )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--train_dir", "no-such-folder"], "--train_dir='no-such-folder'"),
        (["--validation_dir", "VALIDATION"], "--validation_dir=.* without --train_dir"),
        (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor"),
        (["--label_regularizer", "label_smoothing", "--label_smoothing_factor", "0.1"], "--label_smoothing_factor"),
        (["--label_regularizer", "cross_entropy", "--label_regularizer_alpha", "0.1"], "--label_regularizer_alpha"),
        (["--labo_temperature", "0"], "--labo_temperature"),
        (["--model_name_or_path", "some-org/some-vit"], r"--model_name_or_path='some-org/some-vit'.*--model_type vit"),
        (["--model_name_or_path", "./missing/checkpoint"], "no such local file or folder"),
        (["--dataset_name", "beans", "--train_dir", "TRAIN"], "--dataset_name cannot be combined"),
        (["--model_name_or_path", "x", "--config_overrides", "image_size=8"], "--config_overrides"),
        (["--train_dir", "TRAIN", "--validation_dir", "VALIDATION", "--train_val_split", "0.2"], "--train_val_split"),
        (["--train_dir", "TRAIN", "--test_dir", "VALIDATION"], "--test_dir=.* --do_predict"),
        (["--train_dir", "TRAIN", "--train_val_split", "1.5"], r"--train_val_split must lie in \(0, 1\)"),
    ],
)
def test_bad_arguments_fail_fast_with_the_flag(arguments, message, tmp_path, monkeypatch, image_data):
    arguments = [
        str(image_data["train"]) if a == "TRAIN" else str(image_data["validation"]) if a == "VALIDATION" else a
        for a in arguments
    ]
    with pytest.raises(ValueError, match=message):
        run_main(monkeypatch, "--output_dir", str(tmp_path), *arguments)


def test_multi_process_launch_without_use_cpu_is_refused(tmp_path, monkeypatch):
    # What torchrun sets; without GPUs and --use_cpu, transformers would run each process on its own.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="add --use_cpu"):
        run_main(monkeypatch, "--output_dir", str(tmp_path))


def test_folder_layouts(image_data, tmp_path):
    # <split>/<class>/<image> works for folders too (one split folder).
    nested = tmp_path / "nested"
    shutil.copytree(image_data["train"], nested / "train")
    dataset = script.load_image_folders(str(nested), None, None)
    assert len(dataset["train"]) == 36 and dataset["train"].features["label"].names == ["blue", "green", "red"]
    # Two split folders (or images at mixed depths) would mix splits and is refused.
    shutil.copytree(image_data["validation"], nested / "validation")
    with pytest.raises(ValueError, match=r"--train_dir=.*one split.*\['train', 'validation'\]"):
        script.load_image_folders(str(nested), None, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--validation_dir=.* holds no images in class folders"):
        script.load_image_folders(None, str(tmp_path / "empty"), None)
    # A truncated zip (an interrupted download) is named as such.
    with zipfile.ZipFile(tmp_path / "whole.zip", "w") as archive:
        for image in sorted((nested / "train").rglob("*.png")):
            archive.write(image, image.relative_to(nested))
    data = (tmp_path / "whole.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"--train_dir=.*cut\.zip' is neither a folder nor a zip file \(truncated"):
        script.load_image_folders(str(tmp_path / "cut.zip"), None, None)


def test_script_defaults_never_override_user_flags():
    _, _, args, applied = script.parse_arguments(["--output_dir", "x"])
    assert args.do_train and args.do_eval and not args.do_predict
    assert args.learning_rate == 1e-3 and args.num_train_epochs == 30 and args.warmup_steps == 0.1
    assert applied["learning_rate"] == "1e-3"
    # A user value equal to transformers' default is still the user's: detected on the command line.
    _, _, args, applied = script.parse_arguments(["--output_dir", "x", "--learning_rate", "5e-5", "--do_eval"])
    assert args.learning_rate == 5e-5 and "learning_rate" not in applied
    assert args.do_eval and not args.do_train
    # --no_* forms of boolean flags count as set too.
    _, _, args, _ = script.parse_arguments(["--output_dir", "x", "--do_train", "false", "--do_predict"])
    assert not args.do_train and not args.do_eval and args.do_predict
    # --save_steps alone keeps transformers' save_strategy ("steps") instead of the script's "no".
    _, _, args, applied = script.parse_arguments(["--output_dir", "x", "--save_steps", "50"])
    assert args.save_strategy == "steps" and args.save_steps == 50 and "save_strategy" not in applied
    # Fine-tuning a checkpoint: transformers' own defaults, not the from-scratch ones.
    model_args, _, args, applied = script.parse_arguments(["--output_dir", "x", "--model_name_or_path", "m"])
    assert args.learning_rate == 5e-5 and set(applied) == {"do_train", "do_eval"}


def test_script_defaults_are_documented():
    # The module docstring (shown by --help) spells out every default the script applies.
    doc = " ".join(script.__doc__.split())
    for key, value in script.SCRATCH_TRAINING_DEFAULTS.items():
        assert f"--{key} {value}" in doc, key
    assert ",".join(f"{key}={value}" for key, value in script.SMALL_VIT_CONFIG.items()) in doc


def test_arguments_from_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text("output_dir: out\nlabel_regularizer: label_smoothing\nlearning_rate: 0.002\ndo_eval: true\n")
    model_args, data_args, args, applied = script.parse_arguments([str(yaml_file)])
    assert args.label_regularizer == "label_smoothing" and args.learning_rate == 0.002
    assert args.do_eval and not args.do_train
    assert args.num_train_epochs == 30.0 and "learning_rate" not in applied
    json_file = tmp_path / "args.json"
    json_file.write_text(json.dumps({"output_dir": "out", "labo_temperature": 1.5, "train_dir": "d"}))
    _, data_args, args, _ = script.parse_arguments([str(json_file)])
    assert args.labo_temperature == 1.5 and data_args.train_dir == "d" and args.do_train and args.do_eval


def test_arguments_file_with_a_typo_names_the_file_key_and_flag(tmp_path):
    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text("output_dir: out\nlabo_temprature: 1.5\n")
    with pytest.raises(ValueError, match=r"args\.yaml: unknown argument\(s\) 'labo_temprature' \(did you mean "
                       r"'labo_temperature'\?\)"):
        script.parse_arguments([str(yaml_file)])
    json_file = tmp_path / "args.json"
    json_file.write_text(json.dumps({"output_dir": "out", "zzz_qqq": 1}))
    with pytest.raises(ValueError, match=r"args\.json: unknown argument\(s\) 'zzz_qqq'; `--help`"):
        script.parse_arguments([str(json_file)])


def test_help_lists_labo_flags():
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for flag in ("--label_regularizer", "--label_regularizer_alpha", "--labo_temperature", "--train_dir",
                 "--config_overrides", "--horizontal_flip", "--resume_from_checkpoint", "--push_to_hub"):
        assert flag in completed.stdout, flag


def test_two_processes_evaluate_each_example_once(image_data, tmp_path):
    output_dir = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
            "--output_dir", str(output_dir), "--use_cpu",
            "--train_dir", str(image_data["train"]), "--validation_dir", str(image_data["validation"]),
            "--max_steps", "2", "--log_level_replica", "info", *TINY_VIT,
        ],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env,
    )
    if completed.returncode != 0:
        pytest.fail(f"torchrun failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}")
    log = completed.stdout + completed.stderr
    assert "Process rank: 0, world size: 2" in log and "Process rank: 1, world size: 2" in log
    card = (output_dir / "README.md").read_text()
    assert "- num_devices: 2" in card
    results = json.loads((output_dir / "all_results.json").read_text())
    # 15 validation images on 2 processes with batches of 4: the sampler pads to 16 with one duplicate,
    # which the metrics must not count.
    assert results["eval_num_examples"] == 15 and results["eval_samples"] == 15
    # The metrics equal those of the 15 images scored once each by the saved model (a counted duplicate
    # would shift the NLL and the ECE).
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    images, labels = _validation_images(image_data["validation"])
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    assert results["eval_nll"] == pytest.approx(negative_log_likelihood(logits, labels), rel=1e-5)
    assert results["eval_ece"] == pytest.approx(expected_calibration_error(logits, labels), abs=1e-5)
    assert results["eval_accuracy"] == pytest.approx(accuracy(logits, labels))


# ---- nothing lost, nothing mixed: crash-safe resume, guarded output folders, early data errors ----

RESUMABLE = ["--do_train", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--learning_rate", "3e-3",
             "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "6", *TINY_VIT]  # fmt: skip
KILL_DURING_SAVE = """
import os, runpy, signal, sys
from transformers import Trainer
save_optimizer = Trainer._save_optimizer_and_scheduler
def save_then_die(self, output_dir):
    if self.state.global_step == 4:  # weights of checkpoint-4 written, optimizer and trainer state not yet
        os.kill(os.getpid(), signal.SIGKILL)
    save_optimizer(self, output_dir)
Trainer._save_optimizer_and_scheduler = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_killed_during_a_save_the_same_command_resumes_bit_identically(image_data, tmp_path, monkeypatch):
    crashed, straight = tmp_path / "crashed", tmp_path / "straight"
    command = ["--output_dir", str(crashed), "--train_dir", str(image_data["train"]), *RESUMABLE]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(SCRIPT), *command], capture_output=True,
                            text=True, timeout=300, cwd=REPO_ROOT, env=env)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (crashed / "checkpoint-2").is_dir() and not (crashed / "checkpoint-4").exists()

    run_main(monkeypatch, *command)  # the same command again: resumes from checkpoint-2
    run_main(monkeypatch, "--output_dir", str(straight), "--train_dir", str(image_data["train"]), *RESUMABLE)
    resumed, reference = load_file(crashed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    assert json.loads((crashed / "trainer_state.json").read_text())["global_step"] == 6


def test_reused_folder_with_another_regularizer_is_refused_and_overwrite_starts_clean(image_data, tmp_path,
                                                                                      monkeypatch):
    out = tmp_path / "out"
    common = ["--output_dir", str(out), "--train_dir", str(image_data["train"]), "--do_train", "--max_steps", "2",
              "--save_strategy", "steps", "--save_steps", "2", *TINY_VIT]  # fmt: skip
    run_main(monkeypatch, *common)
    with pytest.raises(ValueError, match=r"--label_regularizer: 'cross_entropy' now, 'labo' in the recorded run"):
        run_main(monkeypatch, *common, "--label_regularizer", "cross_entropy", "--max_steps", "4")
    assert json.loads((out / "labo_run.json").read_text())["label_regularizer"] == "labo"

    (out / "all_results.json").write_text(json.dumps({"stale_metric": 1.0}))
    results = run_main(monkeypatch, *common, "--label_regularizer", "cross_entropy", "--max_steps", "4",
                       "--overwrite_output_dir")  # fmt: skip
    assert "stale_metric" not in results and results["train_loss"] > 0  # trained from scratch, 4 steps
    assert json.loads((out / "labo_run.json").read_text())["label_regularizer"] == "cross_entropy"
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert "label-regularizer-cross_entropy" in (out / "README.md").read_text()
    # The same run again, resumed from its own folder: results are this run's only.
    (out / "all_results.json").write_text(json.dumps({"stale_metric": 1.0}))
    results = run_main(monkeypatch, *common, "--label_regularizer", "cross_entropy", "--max_steps", "4")
    assert "stale_metric" not in results


def test_unrelated_non_empty_folder_is_refused(image_data, tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("my notes")
    with pytest.raises(ValueError, match="is not empty .*README.md.* holds no labo-hf run record"):
        run_main(monkeypatch, "--output_dir", str(tmp_path), "--train_dir", str(image_data["train"]), *TINY_VIT)
    assert (tmp_path / "README.md").read_text() == "my notes"


def test_unwritable_output_folder_fails_before_training(image_data, tmp_path, monkeypatch):
    import tempfile

    real = tempfile.NamedTemporaryFile
    out = tmp_path / "out"
    out.mkdir()

    def read_only(*args, **kwargs):
        if os.path.realpath(kwargs.get("dir", "")) == os.path.realpath(out):
            raise PermissionError(13, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ValueError, match="--output_dir=.* is not writable"):
        run_main(monkeypatch, "--output_dir", str(out), "--train_dir", str(image_data["train"]), *TINY_VIT)
    assert os.listdir(out) == []


def _jpeg(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


BAD_JPEGS = {"corrupt": b"\xff\xd8\xff\xe0 not really a JPEG" * 4, "empty": b"", "truncated": _jpeg(0)[:200]}


@pytest.mark.parametrize("kind", list(BAD_JPEGS))
def test_bad_jpeg_is_an_error_naming_the_file_before_training(kind, image_data, tmp_path, monkeypatch):
    train = tmp_path / "train"
    shutil.copytree(image_data["train"], train)
    (train / "red" / f"{kind}.jpg").write_bytes(BAD_JPEGS[kind])
    with pytest.raises(ValueError, match=rf"The train images .*1 of 37 images cannot be decoded: .*red/{kind}\.jpg "
                                         r".*--skip_bad_images"):
        run_main(monkeypatch, "--output_dir", str(tmp_path / "out"), "--train_dir", str(train), "--do_train",
                 *TINY_VIT)  # fmt: skip
    assert not (tmp_path / "out" / "trainer_state.json").exists()


def test_skip_bad_images_drops_and_counts_them(image_data, tmp_path, monkeypatch, caplog):
    train = tmp_path / "train"
    shutil.copytree(image_data["train"], train)
    for kind, data in BAD_JPEGS.items():
        (train / "red" / f"{kind}.jpg").write_bytes(data)
    with caplog.at_level("WARNING"):
        results = run_main(monkeypatch, "--output_dir", str(tmp_path / "out"), "--train_dir", str(train),
                           "--do_train", "--max_steps", "1", "--skip_bad_images", "true", *TINY_VIT)  # fmt: skip
    assert results["train_samples"] == 36
    assert "left out 3 of 39 images that cannot be decoded" in caplog.text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--labo_fused_linear"], "--labo_fused_linear applies to decoder-only causal LMs"),
        (["--label_names", "target"], "--label_names target"),
        (["--model_type", "vit", "--config_overrides", "hiden_size=8"], "--config_overrides='hiden_size=8'"),
        (["--train_dir", "no-such-folder"], "--train_dir='no-such-folder'"),
        (["--train_dir", "TRAIN", "--do_predict"], "--do_predict needs a test split"),
        (["--train_dir", "TRAIN", "--do_train", "--train_val_split", "0.2"], "--train_val_split"),
        (["--model_name_or_path", "./missing/checkpoint"], "no such local file or folder"),
    ],
)
def test_refusals_come_before_any_work(arguments, message, tmp_path, monkeypatch, image_data):
    """Refused flag combinations stop before any data or model work: --output_dir is not even created."""
    arguments = [str(image_data["train"]) if a == "TRAIN" else a for a in arguments]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_main(monkeypatch, "--output_dir", str(out), *arguments)
    assert not out.exists()
