"""The fused linear loss refuses a shard of a sharded lm_head weight with a message saying what to do
(`labo_hf.loss.sharding`); DTensor shards are covered under FSDP2 by `tests/hf/test_fsdp2.py`."""

from __future__ import annotations

import enum

import pytest
import torch

from labo_hf import FusedLinearLABOLoss, fused_linear_label_regularized_loss
from labo_hf.loss.sharding import check_whole_weight


class ZeroParamStatus(enum.Enum):  # DeepSpeed's names, without importing it
    AVAILABLE = 1
    NOT_AVAILABLE = 2


def _zero3_placeholder(shape=(10, 4)) -> torch.nn.Parameter:
    """What ZeRO-3 leaves in a module between its forwards: an empty tensor carrying the real shape."""
    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_status, weight.ds_shape, weight.ds_numel = ZeroParamStatus.NOT_AVAILABLE, torch.Size(shape), 40
    return weight


def test_zero3_placeholder_is_refused_with_the_fix():
    hidden, labels = torch.randn(3, 4), torch.tensor([1, 2, -100])
    for call in (lambda w: fused_linear_label_regularized_loss(hidden, w, labels),
                 lambda w: FusedLinearLABOLoss()(hidden, w, labels)):
        with pytest.raises(ValueError, match=r"weight is a DeepSpeed ZeRO-3 placeholder \(ds_status NOT_AVAILABLE, "
                                             r"shape \(0,\), full shape \(10, 4\)\)") as error:
            call(_zero3_placeholder())
        assert "apply_labo(model, fused_linear=True)" in str(error.value)
        assert "deepspeed.zero.GatheredParameters" in str(error.value)


def test_flat_and_empty_shards_are_refused():
    hidden, labels = torch.randn(3, 4), torch.tensor([1, 2, -100])
    with pytest.raises(ValueError, match="1-D tensor of 20 elements .*FSDP flat-parameter shard"):
        fused_linear_label_regularized_loss(hidden, torch.randn(20), labels)
    with pytest.raises(ValueError, match=r"an empty tensor of shape \(0, 4\)"):
        fused_linear_label_regularized_loss(hidden, torch.randn(0, 4), labels)


def test_whole_weights_pass():
    gathered = torch.nn.Parameter(torch.randn(10, 4))
    gathered.ds_status, gathered.ds_shape = ZeroParamStatus.AVAILABLE, torch.Size((10, 4))  # ZeRO-3, gathered
    for weight in (torch.randn(10, 4), gathered):
        check_whole_weight(weight)
    check_whole_weight("not a tensor")  # the loss's own type check reports it
    loss = fused_linear_label_regularized_loss(torch.randn(3, 4), gathered, torch.tensor([1, 2, -100]))
    assert torch.isfinite(loss)
