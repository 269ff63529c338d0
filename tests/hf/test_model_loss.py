"""`labo_loss_func` as a plain Trainer's ``compute_loss_func``, and ``--labo_fused_linear``: the same parameters
after training as `LABOTrainer`, under gradient accumulation and with two processes."""

from __future__ import annotations

import pytest
import torch
from _loss_func_setup import train
from _torchrun import run_two_processes
from conftest import IGNORE, TASKS, collate, flat_parameters, tiny_llama

from labo_hf import label_regularized_loss, labo_loss_func

TOL = 1e-6


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize(("task_name", "regularizer"), [("llama", "labo"), ("marian", "label_smoothing"),
                                                        ("vit", "labo")])
def test_loss_func_trains_like_labo_trainer_with_accumulation(task_name, regularizer, tmp_path):
    start = flat_parameters(TASKS[task_name].make_model())
    reference = flat_parameters(train("labo_trainer", task_name, str(tmp_path / "a"), 8, 1, 2, regularizer).model)
    assert float((reference - start).abs().max()) > 1e-3  # the runs do move the parameters
    for kind in ("labo_trainer", "loss_func"):
        trainer = train(kind, task_name, str(tmp_path / kind), 4, 2, 2, regularizer)
        _assert_same(flat_parameters(trainer.model), reference)


@pytest.mark.parametrize("task_name", ["llama", "gpt2"])
def test_fused_linear_trains_like_full_logits(task_name, tmp_path):
    # GPT-2 has no loss_type, so a plain Trainer counts labels[..., 0] too; LABOTrainer counts the shifted labels.
    kinds = ("labo_trainer_fused",) if task_name == "gpt2" else ("labo_trainer_fused", "loss_func", "loss_func_fused")
    reference = flat_parameters(train("labo_trainer", task_name, str(tmp_path / "a"), 8, 1, 2).model)
    for kind in kinds:
        trainer = train(kind, task_name, str(tmp_path / kind), 4, 2, 2)
        _assert_same(flat_parameters(trainer.model), reference)
        loss_fn = trainer.compute_loss_func or trainer.labo_loss_function
        assert loss_fn.last_fused == kind.endswith("_fused")
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert len(logs) == 2
        if kind.startswith("labo_trainer"):
            assert all(0 < entry["target_prob"] < 1 and entry["nll"] > 0 for entry in logs)


def test_shift_detection_and_errors():
    model = tiny_llama().eval()
    batch = collate(TASKS["llama"].make_examples(3, seed=2))
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        got = labo_loss_func()(outputs, batch["labels"], num_items_in_batch=50)
        expected = label_regularized_loss(outputs.logits[:, :-1], batch["labels"][:, 1:], num_items_in_batch=50)
        torch.testing.assert_close(got, expected)
        with pytest.raises(ValueError, match="shift_labels"):
            labo_loss_func()(outputs.logits, batch["labels"])
        with pytest.raises(ValueError, match="needs labels"):
            labo_loss_func()(outputs, None)
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) > 0


def test_two_processes_match_one_process(tmp_path):
    result = run_two_processes("_ddp_loss_func_worker.py", tmp_path)
    reference = flat_parameters(train("labo_trainer", "llama", str(tmp_path / "one"), 8, 1, 2).model)
    for kind, run in result.items():
        assert run["num_processes"] == 2 and run["fused"] == kind.endswith("_fused"), kind
        _assert_same(torch.load(tmp_path / f"{kind}.pt"), reference)


def test_labo_trainer_refuses_fused_linear_for_encoder_decoder(tmp_path):
    from conftest import common_args
    from transformers import HfArgumentParser

    from labo_hf.hf.arguments import LABOSeq2SeqTrainingArguments
    from labo_hf.hf.trainers import LABOSeq2SeqTrainer

    (args,) = HfArgumentParser(LABOSeq2SeqTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--labo_fused_linear"]
    )
    assert args.labo_fused_linear
    with pytest.raises(ValueError, match="decoder-only causal LM"):
        LABOSeq2SeqTrainer(model=TASKS["marian"].make_model(), args=args, data_collator=collate)
    plain = LABOSeq2SeqTrainingArguments(**common_args(str(tmp_path)))
    assert not plain.labo_fused_linear


@pytest.mark.parametrize(("task_name", "accumulation"), [("gpt2", 1), ("gpt2", 2), ("llama", 2)])
def test_loss_func_warns_once_when_the_count_includes_unshifted_labels(task_name, accumulation, tmp_path, caplog):
    """GPT-2 has no loss_type, so a plain Trainer counts labels[..., 0] too and the shifted loss comes out too
    small: said once, with the fix. Llama (loss_type "ForCausalLM") is counted right: nothing said."""
    with caplog.at_level("WARNING", logger="labo_hf.hf.model_loss"):
        train("loss_func", task_name, str(tmp_path / "run"), 8 // accumulation, accumulation, 2)
    said = [r.getMessage() for r in caplog.records if "num_items_in_batch" in r.getMessage()]
    if task_name == "gpt2":
        assert len(said) == 1 and 'model.loss_type = "ForCausalLM"' in said[0]
    else:
        assert said == []


def test_labo_loss_func_is_a_function_with_the_class_signature():
    import inspect

    from labo_hf import LABOLossFunction
    from labo_hf.loss.config import LossConfig

    assert inspect.isfunction(labo_loss_func) and labo_loss_func.__doc__
    constructor = list(inspect.signature(LABOLossFunction.__init__).parameters.values())[1:]
    assert list(inspect.signature(labo_loss_func).parameters.values()) == constructor
    loss_fn = labo_loss_func("label_smoothing", 0.2, shift_labels=False, ignore_index=-1)
    assert isinstance(loss_fn, LABOLossFunction) and loss_fn.shift_labels is False
    assert loss_fn.config == LossConfig("label_smoothing", 0.2, None, -1)
    assert LABOLossFunction.from_config(loss_fn.config).config == loss_fn.config


def test_trainer_exposes_its_loss_function_read_only(tmp_path):
    from conftest import common_args
    from transformers import TrainingArguments

    from labo_hf import LABOLossFunction, LABOTrainer

    trainer = LABOTrainer(model=tiny_llama(), args=TrainingArguments(**common_args(str(tmp_path))),
                          data_collator=collate)
    loss_fn = trainer.labo_loss_function
    assert isinstance(loss_fn, LABOLossFunction) and loss_fn.shift_labels is True  # a causal LM
    assert loss_fn.config.regularizer == trainer.label_regularization.regularizer
    with pytest.raises(AttributeError):
        trainer.labo_loss_function = labo_loss_func()
    with pytest.raises(ValueError, match="split must be"):
        trainer.record_loss_stats(loss_fn.last_stats, "test")


def test_seq2seq_trainer_without_decoder_inputs_says_how_to_add_them(tmp_path):
    """A plain Seq2SeqTrainer with compute_loss_func runs the model without labels; a collator that adds no decoder
    inputs then meets transformers' "cannot specify both decoder_input_ids and decoder_inputs_embeds". Given the
    model, the loss function names the fix instead; remove() takes the check away."""
    from conftest import common_args
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    task = TASKS["marian"]
    model = task.make_model()
    loss_fn = labo_loss_func(model=model)
    trainer = Seq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments(**common_args(str(tmp_path), max_steps=1)),
                             train_dataset=task.make_examples(8), data_collator=collate, compute_loss_func=loss_fn)
    with pytest.raises(ValueError, match=r"no decoder_input_ids.*DataCollatorForSeq2Seq\(tokenizer, model=model\)"):
        trainer.train()
    batch = collate(task.make_examples(2))
    assert model(**batch).loss is not None  # with labels, the model builds its decoder inputs itself
    loss_fn.remove()
    with pytest.raises(ValueError, match="decoder_input_ids"):  # transformers' own error, as without the model
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
