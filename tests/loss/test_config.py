"""The loss settings' public seams: the work-chunk override (used by the chunking tests) restores and refuses."""

from __future__ import annotations

import pytest
import torch

from labo_hf.kernels.torch_rows import CHUNK_ELEMENTS
from labo_hf.loss.config import LossConfig, chunk_elements, override_chunk_elements
from labo_hf.loss.functional import label_regularized_loss


def test_override_chunk_elements_restores_even_on_error():
    with pytest.raises(RuntimeError, match="inside"):
        with override_chunk_elements(kernels=7, fused_linear=11):
            assert (chunk_elements("kernels"), chunk_elements("fused_linear")) == (7, 11)
            raise RuntimeError("inside")
    assert (chunk_elements("kernels"), chunk_elements("fused_linear")) == (CHUNK_ELEMENTS, 1 << 24)
    with override_chunk_elements(fused_linear=3):
        assert chunk_elements("kernels") == CHUNK_ELEMENTS  # an unnamed user keeps its value


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_override_chunk_elements_refuses_non_positive_counts(bad):
    with pytest.raises(ValueError, match="kernels must be a positive number of elements"):
        with override_chunk_elements(kernels=bad):
            pass
    assert chunk_elements("kernels") == CHUNK_ELEMENTS


def test_one_row_chunks_give_the_same_loss():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 9), torch.tensor([0, 3, -100, 8, 1, 2])
    whole = label_regularized_loss(logits, labels)
    with override_chunk_elements(kernels=9):
        assert torch.equal(label_regularized_loss(logits, labels), whole)


def test_loss_config_is_frozen_and_resolved():
    config = LossConfig("labo")
    assert (config.alpha, config.temperature) == (0.1, 2.0)
    with pytest.raises(AttributeError):
        config.alpha = 0.2  # type: ignore[misc]
    assert LossConfig("cross_entropy").loss_kwargs()["alpha"] is None
    with pytest.raises(ValueError, match="temperature"):
        LossConfig("label_smoothing", temperature=2.0)
