"""LABOTrainer / LABOSeq2SeqTrainer and their arguments, on tiny models (CPU, offline)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import IGNORE, TASKS, collate, common_args, copy_examples
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments

from labo_hf.hf.arguments import LABOSeq2SeqTrainingArguments, LABOTrainingArguments
from labo_hf.hf.trainers import LabelRegularization, LABOSeq2SeqTrainer, LABOTrainer
from labo_hf.loss.config import DEFAULT_ALPHA, DEFAULT_TEMPERATURE
from labo_hf.loss.functional import label_regularized_loss

REGULARIZERS = ("labo", "label_smoothing", "cross_entropy")


def _classes(task):
    """The trainer and arguments classes to use for a toy task."""
    if task.seq2seq:
        return LABOSeq2SeqTrainer, LABOSeq2SeqTrainingArguments
    return LABOTrainer, LABOTrainingArguments


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _reference_logits_and_targets(task, model, batch):
    """Logits and aligned labels computed without the trainer: the model builds its own decoder inputs
    from the labels, and causal-LM logits/labels are shifted by slicing (transformers' convention)."""
    if task.seq2seq:
        logits = model(**batch).logits  # labels in: the model shifts them into decoder_input_ids itself
        return logits, batch["labels"]
    logits = model(**_model_inputs(batch)).logits
    if task.causal:
        return logits[:, :-1, :], batch["labels"][:, 1:]
    return logits, batch["labels"]


def _regularizer_kwargs(regularizer):
    """Non-default hyperparameters, so that the test sees them reach the loss."""
    if regularizer == "labo":
        return {"label_regularizer_alpha": 0.2, "labo_temperature": 1.5}
    if regularizer == "label_smoothing":
        return {"label_regularizer_alpha": 0.2}
    return {}


def _loss_kwargs(regularizer):
    kwargs = _regularizer_kwargs(regularizer)
    return {
        "regularizer": regularizer,
        "alpha": kwargs.get("label_regularizer_alpha"),
        "temperature": kwargs.get("labo_temperature"),
    }


# ---- training end to end ----


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_training_lowers_loss_logs_stats_and_reloads(task, regularizer, tmp_path):
    trainer_cls, args_cls = _classes(task)
    model = task.make_model()
    args = args_cls(
        **common_args(
            str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=40, learning_rate=3e-2,
            logging_steps=1, lr_scheduler_type="constant", warmup_steps=0,
        ),
        label_regularizer=regularizer,
        **_regularizer_kwargs(regularizer),
    )
    trainer = trainer_cls(
        model=model, args=args, train_dataset=task.make_examples(64, seed=1), data_collator=collate
    )
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 40
    first = sum(entry["loss"] for entry in logs[:3]) / 3
    last = sum(entry["loss"] for entry in logs[-3:]) / 3
    assert last < 0.9 * first, (first, last)

    num_classes = NUM_CLASSES[task.name]
    for entry in logs:
        assert 0.0 < entry["target_prob"] < 1.0
        assert entry["nll"] > 0.0
        if regularizer == "cross_entropy":
            # One micro-batch per log on one process: the loss is exactly the mean nll.
            assert entry["loss"] == pytest.approx(entry["nll"], rel=1e-5)
            assert "smoothing_entropy" not in entry
        elif regularizer == "label_smoothing":
            assert entry["smoothing_entropy"] == pytest.approx(math.log(num_classes), rel=1e-5)
        else:
            # u* lives on the K - 1 non-target classes.
            assert 0.0 < entry["smoothing_entropy"] <= math.log(num_classes - 1) + 1e-5

    save_dir = tmp_path / "saved"
    trainer.save_model(str(save_dir))
    reloaded = task.auto_class.from_pretrained(str(save_dir)).eval()
    assert type(reloaded) is type(model)
    model.eval()
    batch = collate(task.make_examples(4, seed=2))
    with torch.no_grad():
        if task.seq2seq:
            expected, got = model(**batch).logits, reloaded(**batch).logits
        else:
            expected, got = model(**_model_inputs(batch)).logits, reloaded(**_model_inputs(batch)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


NUM_CLASSES = {"marian": 48, "t5": 48, "vit": 4, "gpt2": 48, "llama": 48}


# ---- compute_loss pinned against independent references ----


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_compute_loss_equals_loss_module(task, regularizer, tmp_path):
    trainer_cls, args_cls = _classes(task)
    model = task.make_model().eval()
    args = args_cls(**common_args(str(tmp_path)), label_regularizer=regularizer, **_regularizer_kwargs(regularizer))
    trainer = trainer_cls(model=model, args=args, data_collator=collate)
    examples = task.make_examples(6, seed=3)
    if not task.seq2seq and not task.causal:
        examples[1]["labels"] = IGNORE  # an ignored image must not count
    batch = collate(examples)

    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch))
        logits, targets = _reference_logits_and_targets(task, model, batch)
        expected = label_regularized_loss(logits, targets, **_loss_kwargs(regularizer))
        # With num_items_in_batch the loss is the sum over kept positions divided by it.
        kept = int((targets != IGNORE).sum())
        scaled = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(3 * kept))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scaled, expected / 3, rtol=1e-6, atol=1e-7)


def test_cross_entropy_equals_models_builtin_loss(task, tmp_path):
    trainer_cls, args_cls = _classes(task)
    model = task.make_model().eval()
    args = args_cls(**common_args(str(tmp_path)), label_regularizer="cross_entropy")
    trainer = trainer_cls(model=model, args=args, data_collator=collate)
    # Equal lengths: no padding, so the model's own loss (mean over all labels) is the same reduction.
    examples = task.make_examples(5, seed=4) if not task.seq2seq else copy_examples(5, seed=4, min_len=6, max_len=6)
    if task.causal:
        examples = [e for e in task.make_examples(40, seed=4) if len(e["input_ids"]) == 7][:5]
    batch = collate(examples)
    assert not bool((batch["labels"] == IGNORE).any())
    with torch.no_grad():
        builtin = model(**batch).loss
        got = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(got, builtin, rtol=1e-5, atol=1e-6)


def test_causal_lm_item_count_matches_shifted_labels(tmp_path):
    """GPT-2 has no `loss_type`, so transformers alone would count labels[..., 0] too; our trainer makes the
    count and the shifted loss agree."""
    for name in ("gpt2", "llama"):
        task = TASKS[name]
        trainer = LABOTrainer(
            model=task.make_model(), args=LABOTrainingArguments(**common_args(str(tmp_path))), data_collator=collate
        )
        batch = collate(task.make_examples(6, seed=5))
        expected = int((batch["labels"][:, 1:] != IGNORE).sum())
        assert int(trainer._get_num_items_in_batch([batch], torch.device("cpu"))) == expected


def test_compute_loss_does_not_mutate_inputs_and_returns_outputs(tmp_path):
    task = TASKS["marian"]
    model = task.make_model().eval()
    trainer = LABOSeq2SeqTrainer(
        model=model, args=LABOSeq2SeqTrainingArguments(**common_args(str(tmp_path))), data_collator=collate
    )
    batch = collate(task.make_examples(3, seed=6))
    keys = set(batch)
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert set(batch) == keys
    assert outputs.loss is None  # the model ran without labels: its built-in loss never ran
    assert outputs.logits.shape[:2] == batch["labels"].shape
    assert loss.ndim == 0


# ---- plain transformers arguments ----


def test_plain_arguments_mean_labo_defaults(tmp_path):
    task = TASKS["vit"]
    model = task.make_model().eval()
    trainer = LABOTrainer(model=model, args=TrainingArguments(**common_args(str(tmp_path))), data_collator=collate)
    assert trainer.label_regularization == LabelRegularization("labo", DEFAULT_ALPHA, DEFAULT_TEMPERATURE)
    batch = collate(task.make_examples(4, seed=7))
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch))
        expected = label_regularized_loss(
            model(pixel_values=batch["pixel_values"]).logits, batch["labels"],
            regularizer="labo", alpha=DEFAULT_ALPHA, temperature=DEFAULT_TEMPERATURE,
        )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_plain_arguments_with_label_smoothing_factor_are_refused(tmp_path):
    args = Seq2SeqTrainingArguments(**common_args(str(tmp_path)), label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="LABOTrainingArguments.*--label_regularizer label_smoothing"):
        LABOSeq2SeqTrainer(model=TASKS["marian"].make_model(), args=args, data_collator=collate)


def test_compute_loss_func_and_float_labels_are_refused(tmp_path):
    args = LABOTrainingArguments(**common_args(str(tmp_path)))
    with pytest.raises(ValueError, match="compute_loss_func"):
        LABOTrainer(model=TASKS["vit"].make_model(), args=args, compute_loss_func=lambda *a, **k: 0.0)
    model = TASKS["vit"].make_model()
    trainer = LABOTrainer(model=model, args=args)
    batch = {"pixel_values": torch.zeros(2, 3, 8, 8), "labels": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match="integer class labels"):
        trainer.compute_loss(model, batch)


# ---- arguments ----


@pytest.mark.parametrize("args_cls", [LABOTrainingArguments, LABOSeq2SeqTrainingArguments])
@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"label_regularizer": "focal"}, "--label_regularizer="),
        ({"label_regularizer_alpha": 1.0}, "--label_regularizer_alpha"),
        ({"label_regularizer_alpha": -0.1}, "--label_regularizer_alpha"),
        ({"label_regularizer": "cross_entropy", "label_regularizer_alpha": 0.1}, "--label_regularizer_alpha"),
        ({"labo_temperature": 0.0}, "--labo_temperature"),
        ({"labo_temperature": float("inf")}, "--labo_temperature"),
        ({"label_regularizer": "label_smoothing", "labo_temperature": 2.0}, "--labo_temperature"),
    ],
)
def test_bad_arguments_name_the_flag(args_cls, kwargs, flag, tmp_path):
    with pytest.raises(ValueError, match=flag):
        args_cls(output_dir=str(tmp_path), **kwargs)


def test_label_smoothing_factor_conflict(tmp_path):
    with pytest.raises(ValueError, match="--label_regularizer label_smoothing --label_regularizer_alpha 0.2"):
        LABOTrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.2)


@pytest.mark.parametrize(
    ("kwargs", "resolved"),
    [
        ({}, ("labo", DEFAULT_ALPHA, DEFAULT_TEMPERATURE)),
        ({"label_regularizer_alpha": 0.3, "labo_temperature": 4.0}, ("labo", 0.3, 4.0)),
        ({"label_regularizer": "label_smoothing"}, ("label_smoothing", DEFAULT_ALPHA, None)),
        ({"label_regularizer": "cross_entropy"}, ("cross_entropy", 0.0, None)),
    ],
)
def test_resolved_values_do_not_mutate_fields(kwargs, resolved, tmp_path):
    args = LABOSeq2SeqTrainingArguments(output_dir=str(tmp_path), **kwargs)
    assert (args.label_regularizer, args.resolved_label_regularizer_alpha, args.resolved_labo_temperature) == resolved
    assert args.label_regularizer_alpha == kwargs.get("label_regularizer_alpha")  # None stays None
    assert args.labo_temperature == kwargs.get("labo_temperature")
    assert args.to_dict()["label_regularizer_alpha"] == kwargs.get("label_regularizer_alpha")
    trainer = LABOSeq2SeqTrainer(model=TASKS["marian"].make_model(), args=args, data_collator=collate)
    assert trainer.label_regularization == resolved


@pytest.mark.parametrize("args_cls", [LABOTrainingArguments, LABOSeq2SeqTrainingArguments])
def test_argument_parser_help_and_parsing(args_cls, tmp_path):
    parser = HfArgumentParser(args_cls)
    text = " ".join(parser.format_help().split())
    assert "--label_regularizer {labo,label_smoothing,cross_entropy}" in text
    assert "--label_regularizer_alpha LABEL_REGULARIZER_ALPHA" in text
    assert "--labo_temperature LABO_TEMPERATURE" in text
    assert "Smoothing mass alpha in [0, 1)" in text
    assert "LABO temperature T > 0" in text
    assert "'cross_entropy' (no regularization)" in text

    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--label_regularizer", "label_smoothing", "--label_regularizer_alpha", "0.2"]
    )
    assert (args.label_regularizer, args.label_regularizer_alpha, args.labo_temperature) == ("label_smoothing", 0.2, None)
    with pytest.raises(ValueError, match="--labo_temperature"):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--label_regularizer", "cross_entropy", "--labo_temperature", "2"]
        )


# ---- evaluation: eval_nll ----


def _reference_nll(model, batch):
    """Mean token cross-entropy over the kept labels, from the model's own teacher-forced forward pass."""
    with torch.no_grad():
        logits = model(**batch).logits
    kept = batch["labels"] != IGNORE
    return F.cross_entropy(logits[kept], batch["labels"][kept], reduction="sum").item() / int(kept.sum())


@pytest.mark.parametrize("predict_with_generate", [False, True])
def test_seq2seq_eval_nll(predict_with_generate, tmp_path):
    task = TASKS["marian"]
    model = task.make_model().eval()
    eval_examples = copy_examples(10, seed=8)
    generated = []

    def compute_metrics(prediction):
        # Recording the predictions proves the generation path really ran (and not loss-only evaluation).
        predictions = prediction.predictions
        generated.append(predictions[0] if isinstance(predictions, tuple) else predictions)
        return {}

    args = LABOSeq2SeqTrainingArguments(
        **common_args(str(tmp_path)), per_device_eval_batch_size=4, predict_with_generate=predict_with_generate,
        generation_max_length=12, label_regularizer="labo", label_regularizer_alpha=0.2, labo_temperature=1.5,
    )
    trainer = LABOSeq2SeqTrainer(
        model=model, args=args, eval_dataset=eval_examples, data_collator=collate, compute_metrics=compute_metrics
    )
    metrics = trainer.evaluate()
    full = collate(eval_examples)
    assert metrics["eval_nll"] == pytest.approx(_reference_nll(model, full), rel=1e-5)
    assert 0.0 < metrics["eval_target_prob"] < 1.0
    assert "eval_smoothing_entropy" in metrics
    # eval_loss: the label-regularized loss per kept position of the whole set (batches of 4, 4 and 2 examples
    # keeping different numbers of positions: each batch's mean weighted by its kept count, not by its size).
    loss_sum, kept = 0.0, 0
    for start in range(0, 10, 4):
        batch = collate(eval_examples[start:start + 4])
        with torch.no_grad():
            logits = model(**batch).logits
        count = int((batch["labels"] != IGNORE).sum())
        loss_sum += label_regularized_loss(logits, batch["labels"], alpha=0.2, temperature=1.5).item() * count
        kept += count
    assert metrics["eval_loss"] == pytest.approx(loss_sum / kept, rel=1e-5)
    if predict_with_generate:
        assert generated[0].shape[0] == 10 and generated[0].ndim == 2  # generated token ids
        assert generated[0].dtype.kind == "i"
    else:
        assert generated[0].shape[-1] == NUM_CLASSES["marian"]  # teacher-forced logits

    prediction = trainer.predict(eval_examples, metric_key_prefix="test")
    assert prediction.metrics["test_nll"] == pytest.approx(metrics["eval_nll"], rel=1e-6)
    assert "eval_nll" not in prediction.metrics


def test_eval_nll_for_classification_and_causal_lm(tmp_path):
    for name in ("vit", "llama"):
        task = TASKS[name]
        model = task.make_model().eval()
        examples = task.make_examples(9, seed=9)
        trainer = LABOTrainer(
            model=model,
            args=LABOTrainingArguments(**common_args(str(tmp_path)), per_device_eval_batch_size=4,
                                       label_regularizer="cross_entropy"),
            eval_dataset=examples,
            data_collator=collate,
        )
        metrics = trainer.evaluate()
        batch = collate(examples)
        with torch.no_grad():
            logits, targets = _reference_logits_and_targets(task, model, batch)
        kept = targets != IGNORE
        expected = F.cross_entropy(logits[kept], targets[kept], reduction="sum").item() / int(kept.sum())
        assert metrics["eval_nll"] == pytest.approx(expected, rel=1e-5)
        assert "eval_smoothing_entropy" not in metrics  # cross_entropy has no smoothing distribution


# ---- training statistics over a logging interval ----


class _RecordingTrainer(LABOSeq2SeqTrainer):
    """Records each training micro-step's loss and kept count."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if model.training:
            loss = result[0] if return_outputs else result
            self.steps.append((loss.item(), int((inputs["labels"] != IGNORE).sum())))
        return result


def test_logged_statistics_cover_the_logging_interval_and_exclude_evaluation(tmp_path):
    """With cross-entropy each step's loss is its mean nll, so the logged nll of an interval must be the
    token-weighted mean of its steps' losses (not their plain mean, which is what `loss` reports), and the
    evaluations run in between must not leak into it."""
    examples = copy_examples(12, seed=10, min_len=1, max_len=9)
    args = LABOSeq2SeqTrainingArguments(
        **common_args(str(tmp_path), per_device_train_batch_size=2, max_steps=6, learning_rate=1e-2,
                      logging_steps=3, eval_strategy="steps", eval_steps=1, train_sampling_strategy="sequential"),
        label_regularizer="cross_entropy",
    )
    trainer = _RecordingTrainer(
        model=TASKS["marian"].make_model(), args=args, train_dataset=examples, eval_dataset=examples[:3],
        data_collator=collate,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    evals = [entry for entry in trainer.state.log_history if "eval_nll" in entry]
    assert len(logs) == 2 and len(evals) == 6
    assert len(trainer.steps) == 6
    for log, steps in zip(logs, (trainer.steps[:3], trainer.steps[3:]), strict=True):
        weighted = sum(loss * count for loss, count in steps) / sum(count for _, count in steps)
        assert log["nll"] == pytest.approx(weighted, rel=1e-5)
        assert log["loss"] == pytest.approx(sum(loss for loss, _ in steps) / 3, rel=1e-5)
        assert abs(log["nll"] - log["loss"]) > 1e-4  # the example's step counts differ enough to tell


def test_package_exports_the_trainer_glue():
    import labo_hf

    assert labo_hf.LABOTrainer is LABOTrainer
    assert labo_hf.LABOSeq2SeqTrainer is LABOSeq2SeqTrainer
    assert labo_hf.LABOTrainingArguments is LABOTrainingArguments
    assert labo_hf.LABOSeq2SeqTrainingArguments is LABOSeq2SeqTrainingArguments
    # The type of the public `label_regularization` attribute is public too.
    assert labo_hf.LabelRegularization is LabelRegularization
    assert all(hasattr(labo_hf, name) for name in labo_hf.__all__)  # directly or lazily (trl)


def test_cpu_training_warns_nothing_about_pin_memory(tmp_path):
    """transformers pins data-loader memory by default; without an accelerator torch then warns at every data
    loader, which the user cannot act on."""
    import warnings

    from labo_hf import LABOTrainer, LABOTrainingArguments

    task = TASKS["llama"]
    args = LABOTrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", disable_tqdm=True)
    trainer = LABOTrainer(model=task.make_model(), args=args, train_dataset=task.make_examples(8),
                          eval_dataset=task.make_examples(4), data_collator=collate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
        trainer.evaluate()
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    assert args.dataloader_pin_memory is False


def test_model_card_model_index_holds_the_results_of_a_translation_run(tmp_path, caplog):
    """transformers 5 drops model-index results for tasks it does not list (translation) and for data sets
    without Hub tags (local data), leaving ``results: []``; the card gets the run's metrics instead."""
    from huggingface_hub import ModelCard

    task = TASKS["marian"]
    args = LABOSeq2SeqTrainingArguments(**common_args(str(tmp_path), max_steps=1))
    trainer = LABOSeq2SeqTrainer(model=task.make_model(), args=args, train_dataset=task.make_examples(8),
                                 eval_dataset=task.make_examples(4), data_collator=collate,
                                 compute_metrics=lambda prediction: {"bleu": 12.5})
    trainer.train()
    trainer.evaluate()
    with caplog.at_level("INFO"):
        trainer.create_model_card(tasks="translation", dataset="local de-en data (train)")
    assert not [r for r in caplog.records if "Dropping the following result" in r.getMessage()]
    data = ModelCard.load(tmp_path / "README.md").data
    [result] = data.eval_results
    assert (result.task_type, result.dataset_name, result.metric_type, result.metric_value) == (
        "translation", "local de-en data (train)", "bleu", 12.5)
    assert data.datasets is None
