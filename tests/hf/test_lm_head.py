"""The lm_head capture behind the fused linear loss (`labo_hf.hf.lm_head`): which forwards it captures, what it
hands the loss, which heads it refuses, and that removing it restores the model."""

from __future__ import annotations

import pytest
import torch
from conftest import TASKS, collate, tiny_llama
from torch import nn

from labo_hf import label_regularized_loss, labo_loss_func
from labo_hf.hf.lm_head import LinearHeadCapture, check_plain_linear_head


def _inputs(seed=1, n=3):
    batch = collate(TASKS["llama"].make_examples(n, seed=seed))
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def test_check_plain_linear_head_finds_base_and_head():
    model = tiny_llama()
    base, head = check_plain_linear_head(model)
    assert base is model.model and head is model.lm_head
    model.lm_head = nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="plain nn.Linear, got Sequential"):
        check_plain_linear_head(model)


def test_capture_takes_training_forwards_only_and_once():
    model = tiny_llama().train()
    inputs, labels = _inputs()
    capture = LinearHeadCapture(model)
    outputs = model(**inputs)
    # A captured forward builds one position's logits and hands the loss the whole hidden sequence, once.
    assert outputs.logits.shape[1] == 1
    hidden = capture.take(outputs.logits)
    assert hidden is not None and hidden.shape == (*labels.shape, model.config.hidden_size)
    assert capture.take(outputs.logits) is None
    torch.testing.assert_close(model.lm_head(hidden[:, -1:]), outputs.logits)
    # A forward given labels computes the model's own loss (full logits); so does one without grad.
    assert model(**inputs, labels=labels).logits.shape[1] == labels.shape[1]
    assert capture.take(outputs.logits) is None
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == labels.shape[1]
    assert capture.take(outputs.logits) is None
    capture.remove()
    assert model(**inputs).logits.shape[1] == labels.shape[1]


def test_arm_without_a_forward_hook():
    # hook_forward=False: the caller (apply_labo's patched forward) arms the capture with the forward's kwargs.
    model = tiny_llama().train()
    capture = LinearHeadCapture(model, hook_forward=False)
    assert capture.arm(True, {"input_ids": None}) == {"input_ids": None, "logits_to_keep": 1}
    assert capture.arm(False, {"input_ids": None}) == {"input_ids": None}
    assert capture.arm(True, {"labels": 0}) == {"labels": 0}
    inputs, _ = _inputs()
    assert model(**inputs).logits.shape[1] > 1  # nothing armed it
    capture.remove()


def test_fused_linear_eval_and_plain_forward_keep_logits(tmp_path):
    model = tiny_llama()
    loss_fn = labo_loss_func(fused_linear=True, model=model, shift_labels=True)
    batch = collate(TASKS["llama"].make_examples(3, seed=1))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        assert logits.shape[:2] == batch["labels"].shape
        evaluated = loss_fn(model(**inputs), batch["labels"])
    assert not loss_fn.last_fused
    model.train()
    trained = loss_fn(model(**inputs), batch["labels"])
    assert loss_fn.last_fused
    expected = label_regularized_loss(logits[:, :-1], batch["labels"][:, 1:])
    torch.testing.assert_close(evaluated, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(trained.detach(), expected, rtol=1e-5, atol=1e-6)
    loss_fn.remove()
    model.train()
    assert model(**inputs).logits.shape[:2] == batch["labels"].shape


def test_fused_linear_refuses_non_linear_heads():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
    ))
    with pytest.raises(ValueError, match="softcapping"):
        labo_loss_func(fused_linear=True, model=gemma)
    with pytest.raises(ValueError, match="decoder-only"):
        labo_loss_func(fused_linear=True, model=TASKS["marian"].make_model())
    with pytest.raises(ValueError, match="needs model"):
        labo_loss_func(fused_linear=True)

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, logits_to_keep=0, **kwargs):
            outputs = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            outputs.logits = 2 * outputs.logits
            return outputs

    model = ScaledLlama(tiny_llama().config).train()
    loss_fn = labo_loss_func(fused_linear=True, model=model, shift_labels=True)
    batch = collate(TASKS["llama"].make_examples(2, seed=1))
    with pytest.raises(ValueError, match="not a plain linear map"):
        loss_fn(model(input_ids=batch["input_ids"]), batch["labels"])
