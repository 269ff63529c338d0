"""`labo_loss_func(fused_linear=True)` computes the loss as a call of the lm_head, inside the model's forward when
the targets are given first (`LABOLossFunction.expect`), and the result is the same as after the forward."""

from __future__ import annotations

import pytest
import torch
from conftest import TASKS, collate, tiny_llama

from labo_hf import labo_loss_func


def _loss_and_grads(expect: bool):
    model = tiny_llama().train()
    loss_fn = labo_loss_func(fused_linear=True, model=model, shift_labels=True)
    batch = collate(TASKS["llama"].make_examples(4, seed=3))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    calls = []
    model.lm_head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[-2]))
    if expect:
        loss_fn.expect(batch["labels"], 7)
    outputs = model(**inputs)
    in_forward = len(calls)  # lm_head calls during the forward: the model's last-position one, and ours
    loss = loss_fn(outputs, batch["labels"], num_items_in_batch=7)
    loss.backward()
    assert loss_fn.last_fused
    return loss.detach(), [p.grad.clone() for p in model.parameters()], in_forward, calls


def test_the_loss_inside_the_forward_equals_the_loss_after_it():
    after, after_grads, after_in_forward, after_calls = _loss_and_grads(expect=False)
    inside, inside_grads, inside_in_forward, inside_calls = _loss_and_grads(expect=True)
    assert (after_in_forward, inside_in_forward) == (1, 2)  # the fused call moved into the forward
    assert sorted(after_calls) == sorted(inside_calls) and 1 in after_calls  # whole sequences once, last position once
    torch.testing.assert_close(inside, after, rtol=0, atol=0)
    for a, b in zip(inside_grads, after_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_loss_call_with_other_targets_than_expected_is_refused():
    model = tiny_llama().train()
    loss_fn = labo_loss_func(fused_linear=True, model=model, shift_labels=True)
    batch = collate(TASKS["llama"].make_examples(4, seed=3))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss_fn.expect(batch["labels"], 7)
    outputs = model(**inputs)
    with pytest.raises(ValueError, match="given to expect"):
        loss_fn(outputs, batch["labels"].clone(), num_items_in_batch=7)
    loss_fn.expect(batch["labels"], 7)
    outputs = model(**inputs)
    with pytest.raises(ValueError, match="given to expect"):
        loss_fn(outputs, batch["labels"], num_items_in_batch=8)
