"""`LABOLoss`, `FusedLinearLABOLoss` and `fused_linear_label_regularized_loss` against the reference (pure torch)."""

from __future__ import annotations

import pytest
import torch

from labo_hf import (
    FusedLinearLABOLoss,
    LABOLoss,
    fused_linear_label_regularized_loss,
    fused_linear_label_regularized_loss_with_stats,
    label_regularized_loss_per_position,
)
from labo_hf.loss.reference import (
    reference_label_regularized_loss,
    reference_label_regularized_loss_per_position,
)

IGNORE = -100
SETTINGS = {
    "labo": {"regularizer": "labo", "alpha": 0.2, "temperature": 1.5},
    "label_smoothing": {"regularizer": "label_smoothing", "alpha": 0.2},
    "cross_entropy": {"regularizer": "cross_entropy"},
}


def _logits_and_labels(n=23, k=17, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, k, generator=g)).to(dtype)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[::4] = IGNORE
    return logits, labels


def _reference_per_position(logits, labels, kw):
    return reference_label_regularized_loss_per_position(logits.double(), labels, **kw)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labo_loss_module_matches_reference(setting, reduction):
    kw = SETTINGS[setting]
    logits, labels = _logits_and_labels()
    x = logits.float().requires_grad_()
    x_ref = logits.clone().requires_grad_()
    module = LABOLoss(**kw, reduction=reduction)
    got = module(x, labels)
    weights = torch.linspace(0.5, 2.0, labels.numel()).double()  # grad_output != 1
    if reduction == "none":
        expected = _reference_per_position(x_ref, labels, kw)
        assert got.shape == labels.shape and bool((got[labels == IGNORE] == 0).all())
        (got * weights.float()).sum().backward()
        (expected * weights).sum().backward()
    else:
        expected = reference_label_regularized_loss(x_ref, labels, **kw, num_items_in_batch=1 if reduction == "sum"
                                                    else None)
        (3 * got).backward()
        (3 * expected).backward()
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)


def test_labo_loss_mean_honours_num_items_and_refuses_it_elsewhere():
    logits, labels = _logits_and_labels(dtype=torch.float32)
    expected = reference_label_regularized_loss(logits, labels, num_items_in_batch=40)
    torch.testing.assert_close(LABOLoss()(logits, labels, num_items_in_batch=40), expected.float())
    with pytest.raises(ValueError, match="num_items_in_batch"):
        LABOLoss(reduction="sum")(logits, labels, num_items_in_batch=40)
    with pytest.raises(ValueError, match="reduction"):
        LABOLoss(reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        LABOLoss(regularizer="label_smoothing", temperature=2.0)


def test_per_position_masked_classes_and_bf16():
    logits, labels = _logits_and_labels(k=9)
    logits[0, :] = float("-inf")
    logits[0, 3] = 1.0
    labels[0] = 3  # no finite non-target logit: the target is the one-hot label
    logits[1, 5] = float("-inf")
    kw = SETTINGS["labo"]
    got = label_regularized_loss_per_position(logits.to(torch.bfloat16), labels, **kw)
    expected = _reference_per_position(logits.to(torch.bfloat16), labels, kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


# ---- fused linear ----


def _hidden_problem(n=29, h=6, v=31, seed=1, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1::5] = IGNORE
    return hidden, weight, b, labels


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("num_items", [None, 50])
def test_fused_linear_matches_reference_values_and_gradients(setting, chunk_size, num_items):
    kw = SETTINGS[setting]
    hidden, weight, bias, labels = _hidden_problem()
    leaves = [t.float().requires_grad_() for t in (hidden, weight, bias)]
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, stats = fused_linear_label_regularized_loss_with_stats(
        *leaves[:2], labels, leaves[2], **kw, num_items_in_batch=num_items, chunk_size=chunk_size
    )
    logits = torch.addmm(ref_leaves[2], ref_leaves[0], ref_leaves[1].T)
    expected = reference_label_regularized_loss(logits, labels, **kw, num_items_in_batch=num_items)
    (0.37 * loss).backward()
    (0.37 * expected).backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for got, ref in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)
    assert bool((leaves[0].grad[labels == IGNORE] == 0).all())
    kept = labels != IGNORE
    assert int(stats.num_kept) == int(kept.sum())
    nll = torch.nn.functional.cross_entropy(logits[kept], labels[kept], reduction="sum")
    torch.testing.assert_close(stats.nll_sum.double(), nll.detach(), rtol=1e-5, atol=1e-5)


def test_fused_linear_without_bias_module_and_sum():
    hidden, weight, _, labels = _hidden_problem(bias=False)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    got = FusedLinearLABOLoss(reduction="sum", chunk_size=4)(h, w, labels)
    got.backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = reference_label_regularized_loss(h_ref @ w_ref.T, labels, num_items_in_batch=1)
    expected.backward()
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reduction='none'"):
        FusedLinearLABOLoss(reduction="none")


def test_fused_linear_bf16_matches_unfused_bf16_path():
    hidden, weight, bias, labels = _hidden_problem(n=40, h=16, v=64)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (hidden, weight, bias)]
    unfused = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fused_linear_label_regularized_loss(*leaves[:2], labels, leaves[2], chunk_size=9)
    (2.0 * loss).backward()
    from labo_hf import label_regularized_loss

    expected = label_regularized_loss(torch.addmm(unfused[2], unfused[0], unfused[1].T), labels)
    (2.0 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    for got, ref in zip(leaves, unfused, strict=True):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.float(), ref.grad.float(), rtol=2e-2, atol=2e-3)


def test_fused_linear_small_default_chunks_and_weight_blocks():
    """With a tiny element budget the default chunk_size and the low-precision weight-gradient blocks split the
    work many times over; the results equal the one-chunk computation."""
    from labo_hf.loss.config import chunk_elements, override_chunk_elements

    hidden, weight, bias, labels = _hidden_problem(n=40, h=16, v=64)
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
        whole = [t.detach().clone().requires_grad_() for t in leaves]
        (3.0 * fused_linear_label_regularized_loss(*whole[:2], labels, whole[2], chunk_size=40)).backward()
        with override_chunk_elements(fused_linear=5 * 64):  # 5 rows per chunk, 20 rows of V per block
            assert chunk_elements("fused_linear") == 5 * 64
            loss = fused_linear_label_regularized_loss(*leaves[:2], labels, leaves[2])
        (3.0 * loss).backward()
        assert chunk_elements("fused_linear") == 1 << 24
        tol = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
        for got, ref in zip(leaves, whole, strict=True):
            assert got.grad.dtype == dtype
            torch.testing.assert_close(got.grad.float(), ref.grad.float(), **tol)


def test_fused_linear_no_grad_all_ignored_and_bad_input():
    hidden, weight, bias, labels = _hidden_problem()
    with torch.no_grad():
        value = fused_linear_label_regularized_loss(hidden.float(), weight.float(), labels, bias.float())
    expected = reference_label_regularized_loss(torch.addmm(bias, hidden, weight.T), labels)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    h = hidden.float().requires_grad_()
    zero = fused_linear_label_regularized_loss(h, weight.float(), torch.full_like(labels, IGNORE))
    zero.backward()
    assert float(zero.detach()) == 0.0 and bool((h.grad == 0).all())
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_label_regularized_loss(hidden, weight, torch.full_like(labels, 99))
    with pytest.raises(ValueError, match="hidden must be"):
        fused_linear_label_regularized_loss(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="one dtype"):
        fused_linear_label_regularized_loss(hidden.float(), weight, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_label_regularized_loss(hidden, weight, labels, chunk_size=0)
    # The caller's tensors are not modified.
    before = [t.clone() for t in (hidden, weight, labels)]
    fused_linear_label_regularized_loss(hidden, weight, labels)
    for t, b in zip((hidden, weight, labels), before, strict=True):
        assert torch.equal(t, b)


def test_fused_linear_backward_twice_is_refused():
    hidden, weight, bias, labels = _hidden_problem()
    h = hidden.float().requires_grad_()
    loss = fused_linear_label_regularized_loss(h, weight.float(), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("loss_scale", [1.0, 65536.0])
def test_fused_linear_fp16_under_a_loss_scale(loss_scale):
    # As under fp16 autocast + GradScaler: fp16 hidden states and lm_head, a scaled fp32 loss. The logits'
    # gradient (p - q) / N must not be rounded to fp16 before the scale lifts it (it underflowed before).
    n, h, v = 512, 16, 32000
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::7] = IGNORE
    h16, w16 = (t.to(torch.float16).requires_grad_() for t in (hidden, weight))
    loss = fused_linear_label_regularized_loss(h16, w16, labels, regularizer="labo", alpha=0.1, temperature=2.0)
    (loss * loss_scale).backward()
    h_ref, w_ref = (t.to(torch.float16).double().requires_grad_() for t in (hidden, weight))
    expected = reference_label_regularized_loss(h_ref @ w_ref.T, labels, regularizer="labo", alpha=0.1,
                                                temperature=2.0)
    (expected * loss_scale).backward()
    for got, ref in ((h16.grad, h_ref.grad), (w16.grad, w_ref.grad)):
        assert bool(torch.isfinite(got).all())
        rel_l1 = float((got.double() - ref).abs().sum() / ref.abs().sum())
        assert rel_l1 < 2e-3, rel_l1


def test_fused_linear_num_items_in_batch_is_validated_not_clamped():
    hidden, weight, bias, labels = _hidden_problem()
    for bad in (torch.tensor(0), torch.tensor(-5), torch.tensor(float("inf")), float("inf"), -1):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            fused_linear_label_regularized_loss(hidden.float(), weight.float(), labels, num_items_in_batch=bad)


def test_modules_hold_one_frozen_config():
    from labo_hf.loss.config import LossConfig

    loss_fn = LABOLoss(regularizer="label_smoothing", alpha=0.2, reduction="sum")
    assert loss_fn.config == LossConfig("label_smoothing", 0.2)
    assert (loss_fn.regularizer, loss_fn.alpha, loss_fn.temperature, loss_fn.ignore_index) == (
        "label_smoothing", 0.2, None, IGNORE)
    assert "alpha=0.2" in repr(loss_fn) and "reduction='sum'" in repr(loss_fn)
    with pytest.raises(AttributeError):
        loss_fn.alpha = 0.3  # a setting changed after the fact would silently not reach the loss
    assert FusedLinearLABOLoss().config == LossConfig("labo", 0.1, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearLABOLoss(regularizer="cross_entropy", temperature=2.0)
    with pytest.raises(ValueError, match="ignore_index"):
        LABOLoss(ignore_index=1.5)


def test_fused_linear_label_range_is_checked_once_and_only_when_validating():
    from labo_hf.loss.validation import check_loss_stats

    hidden, weight, bias, labels = _hidden_problem()
    bad = labels.clone()
    bad[1] = weight.shape[0] + 3
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {weight.shape[0]}\).*found \[{weight.shape[0] + 3}\]"):
        fused_linear_label_regularized_loss_with_stats(hidden, weight, bad, bias, validate=True)
    # Unvalidated (the default on GPUs: no host sync), the call returns NaN and poisons its statistics; the
    # logging step's check raises the ValueError then.
    h = hidden.float().requires_grad_()
    loss, stats = fused_linear_label_regularized_loss_with_stats(h, weight.float(), bad, bias.float(), validate=False)
    assert loss.isnan() and stats.num_kept.isnan()
    with pytest.raises(ValueError, match="invalid inputs"):
        check_loss_stats(stats)
    # Valid labels unvalidated: the same values as validated.
    valid = [fused_linear_label_regularized_loss_with_stats(hidden, weight, labels, bias, validate=v) for v in (True, False)]
    torch.testing.assert_close(valid[0][0], valid[1][0])
    torch.testing.assert_close(torch.stack(valid[0][1]), torch.stack(valid[1][1]))
