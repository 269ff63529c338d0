"""`apply_labo`: a model's own loss becomes the LABO loss; undo; the saved model is a plain model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TASKS, collate, loss_kwargs

from labo_hf import apply_labo, label_regularized_loss, remove_labo

MODELS = ["gpt2", "llama", "marian", "t5"]


def _batch(task):
    return collate(task.make_examples(4, seed=3))


def _expected(task, model, batch, **loss_args):
    """The loss computed by hand from the logits of an unpatched forward."""
    with torch.no_grad():
        if task.seq2seq:
            logits = model(**batch).logits
            return label_regularized_loss(logits, batch["labels"], **loss_args)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return label_regularized_loss(logits[:, :-1], batch["labels"][:, 1:], **loss_args)


@pytest.mark.parametrize("name", MODELS)
def test_model_loss_is_labo_and_undo_restores_it(name, tmp_path):
    task = TASKS[name]
    model = task.make_model().eval()
    batch = _batch(task)
    model.save_pretrained(tmp_path / "before")
    with torch.no_grad():
        builtin = model(**batch).loss
    expected = _expected(task, model, batch, **loss_kwargs("labo"))
    count = torch.tensor(37)
    expected_count = _expected(task, model, batch, **loss_kwargs("labo"), num_items_in_batch=count)

    handle = apply_labo(model, **loss_kwargs("labo"))
    with torch.no_grad():
        got = model(**batch).loss
        got_count = model(**batch, num_items_in_batch=count).loss
        tuple_loss = model(**batch, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_count, expected_count, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tuple_loss, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, builtin)
    with pytest.raises(ValueError, match="already applied"):
        apply_labo(model)

    # Saved while patched: a plain model with the same config, loading with no labo-hf involvement.
    model.save_pretrained(tmp_path / "saved")
    config_files = [json.loads((tmp_path / folder / "config.json").read_text()) for folder in ("before", "saved")]
    assert config_files[0] == config_files[1]
    reloaded = task.auto_class.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).loss, builtin, rtol=1e-6, atol=1e-6)

    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, builtin, rtol=0, atol=0)
    remove_labo(model)  # a second undo does nothing


def test_gradient_flows_and_fused_linear_matches(tmp_path):
    task = TASKS["llama"]
    batch = _batch(task)
    plain = task.make_model().train()
    apply_labo(plain, **loss_kwargs("labo"))
    plain(**batch).loss.backward()
    fused = task.make_model().train()
    apply_labo(fused, **loss_kwargs("labo"), fused_linear=True)
    outputs = fused(**batch)
    assert outputs.logits is None
    outputs.loss.backward()
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    fused.eval()
    with torch.no_grad():
        evaluated = fused(**batch)
    assert evaluated.logits.shape[:2] == batch["labels"].shape
    remove_labo(fused)
    with pytest.raises(ValueError, match="decoder-only"):
        apply_labo(TASKS["t5"].make_model(), fused_linear=True)


def test_trainer_passes_num_items_to_patched_model(tmp_path):
    """A plain Trainer on a patched model gets the LABO loss, reduced by the whole batch's count."""
    from conftest import common_args
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    task = TASKS["marian"]
    model = task.make_model().eval()
    apply_labo(model, **loss_kwargs("labo"))
    trainer = Seq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments(**common_args(str(tmp_path))),
                             data_collator=collate)
    assert trainer.model_accepts_loss_kwargs
    batch = _batch(task)
    count = torch.tensor(50)
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
    torch.testing.assert_close(got, _expected(task, model, batch, **loss_kwargs("labo"), num_items_in_batch=count))


def test_gpt2_counts_shifted_labels_while_patched(tmp_path):
    from conftest import common_args
    from transformers import Trainer, TrainingArguments

    model = TASKS["gpt2"].make_model()
    handle = apply_labo(model)
    trainer = Trainer(model=model, args=TrainingArguments(**common_args(str(tmp_path))), data_collator=collate)
    batch = collate(TASKS["gpt2"].make_examples(5, seed=4))
    assert int(trainer._get_num_items_in_batch([batch], torch.device("cpu"))) == int((batch["labels"][:, 1:] != -100).sum())
    handle.remove()
    assert model.loss_type is None
