"""`apply_labo`: a model's own loss becomes the LABO loss; undo; the saved model is a plain model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PAD, TASKS, VOCAB, collate, loss_kwargs

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


# ---- every head family transformers gives a loss function ----
# One tiny model per family, built from a config; both ways the model can compute its loss are covered
# (through ``self.loss_function``: Llama/ViT/BERT masked LM/GPT-NeoX token classification/Llama sequence
# classification; calling CrossEntropyLoss itself: BERT classification heads, Wav2Vec2 audio classification).

_BERT = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 32, "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0, "pad_token_id": PAD}


def _bert(head, **config):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, f"Bert{head}")(transformers.BertConfig(**_BERT, **config))


def _llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=PAD, num_labels=3))


def _neox_tokens():
    from transformers import GPTNeoXConfig, GPTNeoXForTokenClassification

    torch.manual_seed(0)
    return GPTNeoXForTokenClassification(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, num_labels=5, classifier_dropout=0.0, hidden_dropout=0.0,
        attention_dropout=0.0))


def _wav2vec2_audio(**config):
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    return Wav2Vec2ForSequenceClassification(Wav2Vec2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 4), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, classifier_proj_size=8, hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0, **{"num_labels": 3, **config}))


def _tokens(n_labels, per_position):
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    labels = torch.randint(0, n_labels, ids.shape if per_position else (3,), generator=generator)
    if per_position:
        labels[0, 5:] = -100
        labels[1, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _pixels():
    return collate(TASKS["vit"].make_examples(4, seed=3))


def _audio():
    generator = torch.Generator().manual_seed(5)
    return {"input_values": torch.randn(3, 160, generator=generator), "labels": torch.tensor([0, 2, 1])}


# family -> (model factory, batch factory, whether labels are shifted (causal LM)). The "-pooled" and
# "-loss-function" ones are transformers' generic heads, which call their loss without num_items_in_batch: the
# patched model still reduces by it.
FAMILIES = {
    "causal-lm": (TASKS["llama"].make_model, lambda: _batch(TASKS["llama"]), True),
    "causal-lm-no-loss-type": (TASKS["gpt2"].make_model, lambda: _batch(TASKS["gpt2"]), True),
    "masked-lm": (lambda: _bert("ForMaskedLM"), lambda: _tokens(VOCAB, True), False),
    "text-classification": (lambda: _bert("ForSequenceClassification", num_labels=3),
                            lambda: _tokens(3, False), False),
    "text-classification-pooled": (_llama_classifier, lambda: _tokens(3, False), False),
    "image-classification": (TASKS["vit"].make_model, _pixels, False),
    "audio-classification": (_wav2vec2_audio, _audio, False),
    "token-classification": (lambda: _bert("ForTokenClassification", num_labels=5),
                             lambda: _tokens(5, True), False),
    "token-classification-loss-function": (_neox_tokens, lambda: _tokens(5, True), False),
    "seq2seq": (TASKS["marian"].make_model, lambda: _batch(TASKS["marian"]), False),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_head_family_gets_the_labo_loss(family):
    from labo_hf import LABOLoss

    make_model, make_batch, shifted = FAMILIES[family]
    model, batch = make_model().eval(), make_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["labels"] = batch["labels"]  # the decoder inputs come from the labels
    with torch.no_grad():
        builtin = model(**batch).loss
        logits = model(**inputs).logits
    labels = batch["labels"]
    if shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    criterion = LABOLoss(**loss_kwargs("labo"))
    count = torch.tensor(11)

    apply_labo(model, **loss_kwargs("labo"))
    with torch.no_grad():
        got = model(**batch).loss
        got_count = model(**batch, num_items_in_batch=count).loss
    torch.testing.assert_close(got, criterion(logits, labels), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_count, criterion(logits, labels, num_items_in_batch=count), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, builtin)

    remove_labo(model)
    assert "forward" not in model.__dict__ and "_loss_function" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, builtin, rtol=0, atol=0)




@pytest.mark.parametrize(("make_model", "match"), [
    (lambda: _bert("ForQuestionAnswering"), "BertForQuestionAnswering: question answering"),
    (lambda: _bert("ForSequenceClassification", num_labels=1), "regression"),
    (lambda: _bert("ForSequenceClassification", num_labels=3, problem_type="regression"), "regression"),
    (lambda: _bert("ForSequenceClassification", num_labels=3, problem_type="multi_label_classification"),
     "multi-label"),
    (lambda: _wav2vec2_audio(num_labels=1), "Wav2Vec2ForSequenceClassification as a regression head"),
])
def test_heads_labo_cannot_serve_are_refused_by_name(make_model, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        apply_labo(model)
    assert getattr(model, "_labo_handle", None) is None


def test_ctc_is_refused_by_its_loss_name():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    model = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
                                          conv_stride=(4, 4), conv_kernel=(8, 4), num_conv_pos_embeddings=4,
                                          num_conv_pos_embedding_groups=2))
    with pytest.raises(ValueError, match="Wav2Vec2ForCTC: its loss is transformers' ForCTCLoss"):
        apply_labo(model)
