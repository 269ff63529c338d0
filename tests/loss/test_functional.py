"""The loss functions against hand-computed cases, scipy, torch and the reference path.

Covers the properties docs/method.md states: the closed form u* and its limits (section 3), the
gradient p - q and the reduction (section 4), and torch's label-smoothing convention (section 6).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _fused_rows import fused_rows
from scipy.optimize import minimize

from labo_hf.kernels import torch_rows
from labo_hf.loss.config import override_chunk_elements, resolve_hyperparameters
from labo_hf.loss.functional import label_regularized_loss, label_regularized_loss_with_stats, labo_target
from labo_hf.loss.reference import reference_label_regularized_loss, reference_target_distribution
from labo_hf.loss.validation import LossStats

REGULARIZER_KWARGS = {
    "labo": {"regularizer": "labo", "alpha": 0.1, "temperature": 2.0},
    "label_smoothing": {"regularizer": "label_smoothing", "alpha": 0.1},
    "cross_entropy": {"regularizer": "cross_entropy"},
}


def loss_and_grad(fn, logits, labels, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


# --- hand-computed 3-class cases ----------------------------------------------------------

def test_hand_computed_three_classes_temperature_1():
    # p = [1/2, 1/4, 1/4]; u* at T=1 over {1, 2} = [0, 1/2, 1/2]; q = [0.9, 0.05, 0.05].
    logits = torch.tensor([[math.log(4), math.log(2), math.log(2)]])
    labels = torch.tensor([0])
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels, alpha=0.1, temperature=1.0)
    assert loss.item() == pytest.approx(1.1 * math.log(2), abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-0.4, 0.2, 0.2]]), atol=1e-6, rtol=0)
    u = labo_target(logits, labels, temperature=1.0)
    torch.testing.assert_close(u, torch.tensor([[0.0, 0.5, 0.5]]))


def test_hand_computed_three_classes_temperature_2():
    # p = [1/6, 4/6, 1/6]; u* at T=2 is proportional to exp(z/2) = [2, 1] over {1, 2}.
    logits = torch.tensor([[0.0, math.log(4), 0.0]])
    labels = torch.tensor([0])
    q = [0.9, 0.1 * 2 / 3, 0.1 * 1 / 3]
    p = [1 / 6, 4 / 6, 1 / 6]
    expected = -sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True))
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels, alpha=0.1, temperature=2.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[pk - qk for pk, qk in zip(p, q, strict=True)]]),
                               atol=1e-6, rtol=0)
    # Label smoothing on the same case: q = 0.9 e_y + 0.1 / 3.
    q_ls = [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]
    expected_ls = -sum(qk * math.log(pk) for qk, pk in zip(q_ls, p, strict=True))
    loss_ls = label_regularized_loss(logits, labels, regularizer="label_smoothing", alpha=0.1)
    assert loss_ls.item() == pytest.approx(expected_ls, abs=1e-6)


def test_stats_hand_computed():
    logits = torch.tensor([[math.log(4), math.log(2), math.log(2)], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, -100])
    loss, stats = label_regularized_loss_with_stats(logits, labels, temperature=1.0)
    assert isinstance(stats, LossStats)
    assert stats.num_kept.item() == 1
    assert stats.nll_sum.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats.target_prob_sum.item() == pytest.approx(0.5, abs=1e-6)
    assert stats.smoothing_entropy_sum.item() == pytest.approx(math.log(2), abs=1e-6)
    _, ls_stats = label_regularized_loss_with_stats(logits, labels, regularizer="label_smoothing")
    assert ls_stats.smoothing_entropy_sum.item() == pytest.approx(math.log(3), abs=1e-6)
    _, ce_stats = label_regularized_loss_with_stats(logits, labels, regularizer="cross_entropy")
    assert ce_stats.smoothing_entropy_sum.item() == 0.0


# --- docs/method.md, sections 3, 4 and 6 ----------------------------------------------------

@pytest.mark.parametrize("regularizer", ["labo", "label_smoothing"])
def test_alpha_zero_is_cross_entropy(regularizer):
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 11)
    labels = torch.randint(0, 11, (6, 5))
    labels[0, :3] = -100
    kwargs = {"temperature": 3.0} if regularizer == "labo" else {}
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels, regularizer=regularizer,
                               alpha=0.0, **kwargs)
    ref, ref_grad = loss_and_grad(
        lambda x, y: F.cross_entropy(x.reshape(-1, 11), y.reshape(-1), ignore_index=-100), logits, labels
    )
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=0)


def test_cross_entropy_and_label_smoothing_match_torch():
    torch.manual_seed(1)
    logits = torch.randn(40, 23)
    labels = torch.randint(0, 23, (40,))
    labels[::7] = -100
    for kwargs, torch_kwargs in [({"regularizer": "cross_entropy"}, {}),
                                 ({"regularizer": "label_smoothing", "alpha": 0.2}, {"label_smoothing": 0.2})]:
        loss, grad = loss_and_grad(label_regularized_loss, logits, labels, **kwargs)
        ref, ref_grad = loss_and_grad(F.cross_entropy, logits, labels, ignore_index=-100, **torch_kwargs)
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=0)


def test_large_temperature_is_label_smoothing_over_non_targets():
    torch.manual_seed(2)
    k = 13
    logits = torch.randn(9, k) * 3
    labels = torch.randint(0, k, (9,))
    alpha = 0.2
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels, alpha=alpha, temperature=1e7)
    # fairseq's form: 1 - alpha on the label, alpha / (K - 1) on every other class.
    onehot = F.one_hot(labels, k).double()
    q = (1 - alpha) * onehot + alpha / (k - 1) * (1 - onehot)
    logp = torch.log_softmax(logits.double(), dim=-1)
    expected = -(q * logp).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(grad.double(), (logp.exp() - q) / 9, atol=1e-6, rtol=0)


def _numerical_inner_solution(z: np.ndarray, y: int, temperature: float) -> np.ndarray:
    """argmin over the simplex with u_y = 0 of KL(u || p_bar) - (T - 1) H(u), by L-BFGS."""
    others = np.array([k for k in range(len(z)) if k != y])
    log_p_bar = z[others] - np.log(np.exp(z[others] - z[others].max()).sum()) - z[others].max()

    def objective(theta):
        theta = theta - theta.max()
        log_u = theta - np.log(np.exp(theta).sum())
        u = np.exp(log_u)
        kl = np.sum(u * (log_u - log_p_bar))
        entropy = -np.sum(u * log_u)
        return kl - (temperature - 1.0) * entropy

    result = minimize(objective, np.zeros(len(others)), method="L-BFGS-B",
                      options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
    theta = result.x - result.x.max()
    u = np.zeros(len(z))
    u[others] = np.exp(theta) / np.exp(theta).sum()
    return u


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_closed_form_equals_numerical_minimizer(temperature):
    rng = np.random.default_rng(int(temperature * 10))
    z = rng.normal(size=(4, 7)) * 1.5
    labels = rng.integers(0, 7, size=4)
    closed = labo_target(torch.tensor(z), torch.tensor(labels), temperature=temperature).numpy()
    for row in range(4):
        numerical = _numerical_inner_solution(z[row], int(labels[row]), temperature)
        np.testing.assert_allclose(closed[row], numerical, atol=1e-5)


@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_gradient_is_p_minus_q(regularizer):
    torch.manual_seed(3)
    logits = torch.randn(17, 29, dtype=torch.float64).float()
    labels = torch.randint(0, 29, (17,))
    labels[3] = -100
    kwargs = REGULARIZER_KWARGS[regularizer]
    _, grad = loss_and_grad(label_regularized_loss, logits, labels, **kwargs)
    q = reference_target_distribution(logits.double(), labels, **kwargs)
    p = torch.softmax(logits.double(), dim=-1)
    kept = (labels != -100).unsqueeze(1)
    expected = torch.where(kept, p - q, 0.0) / kept.sum()
    torch.testing.assert_close(grad.double(), expected, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("chunk_elements", [None, 3000])
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
@pytest.mark.parametrize("num_classes", [2, 7, 1000, 70_000])
def test_fused_path_equals_reference(regularizer, num_classes, chunk_elements):
    torch.manual_seed(num_classes)
    n = 3 + 70_000 // num_classes
    logits = torch.randn(n, num_classes) * 4
    labels = torch.randint(0, num_classes, (n,))
    labels[::4] = -100
    kwargs = REGULARIZER_KWARGS[regularizer]
    # chunk_elements: many chunks, the last one partial (one row per chunk for K = 70,000).
    with override_chunk_elements(kernels=chunk_elements):
        loss, grad = loss_and_grad(label_regularized_loss, logits, labels, **kwargs)
    # The reference in float64 is more exact than either float32 computation.
    ref, ref_grad = loss_and_grad(reference_label_regularized_loss, logits.double(), labels, **kwargs)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6 / n, rtol=1e-6)


def test_reference_float32_agrees_with_float64():
    torch.manual_seed(4)
    logits = torch.randn(8, 50)
    labels = torch.randint(0, 50, (8,))
    a = reference_label_regularized_loss(logits, labels)
    b = reference_label_regularized_loss(logits.double(), labels)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_padding_invariance(regularizer):
    torch.manual_seed(5)
    logits = torch.randn(5, 6, 19)
    labels = torch.randint(0, 19, (5, 6))
    kwargs = REGULARIZER_KWARGS[regularizer]
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels, **kwargs)
    # Extra padded positions, with garbage (even NaN) logits, change neither loss nor gradient.
    padded_logits = torch.cat([logits, torch.full((5, 3, 19), float("nan"))], dim=1)
    padded_labels = torch.cat([labels, torch.full((5, 3), -100)], dim=1)
    padded_loss, padded_grad = loss_and_grad(label_regularized_loss, padded_logits, padded_labels, **kwargs)
    # Only the summation order over rows differs.
    assert padded_loss.item() == pytest.approx(loss.item(), rel=1e-7)
    torch.testing.assert_close(padded_grad[:, :6], grad, atol=0, rtol=0)
    assert torch.all(padded_grad[:, 6:] == 0)


@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_sum_of_rows_and_accumulation_equal_big_batch(regularizer):
    torch.manual_seed(6)
    logits = torch.randn(12, 31)
    labels = torch.randint(0, 31, (12,))
    labels[[1, 2, 9]] = -100
    kwargs = REGULARIZER_KWARGS[regularizer]
    big, big_grad = loss_and_grad(label_regularized_loss, logits, labels, **kwargs)
    num_kept = int((labels != -100).sum())
    # Per-position losses (each a batch of one) summed and divided by the count.
    per_row = [label_regularized_loss(logits[i:i + 1], labels[i:i + 1], num_items_in_batch=1, **kwargs)
               for i in range(12) if labels[i] != -100]
    assert (sum(per_row) / num_kept).item() == pytest.approx(big.item(), rel=1e-6)
    # Three micro-batches reduced by the whole batch's count, gradients summed.
    total = torch.zeros(())
    grads = []
    for chunk in range(3):
        rows = slice(4 * chunk, 4 * chunk + 4)
        micro, micro_grad = loss_and_grad(label_regularized_loss, logits[rows], labels[rows],
                                          num_items_in_batch=torch.tensor(num_kept), **kwargs)
        total += micro
        grads.append(micro_grad)
    assert total.item() == pytest.approx(big.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat(grads), big_grad, atol=1e-8, rtol=1e-6)


def test_num_items_in_batch_int_float_and_tensor_agree():
    torch.manual_seed(7)
    logits = torch.randn(4, 9)
    labels = torch.randint(0, 9, (4,))
    values = [label_regularized_loss(logits, labels, num_items_in_batch=n).item()
              for n in (10, 10.0, torch.tensor(10), torch.tensor([10.0]))]
    assert values == pytest.approx([values[0]] * 4)
    total = reference_label_regularized_loss(logits, labels) * 4
    assert values[0] == pytest.approx(total.item() / 10, rel=1e-6)


@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_all_padding_batch_is_zero_with_zero_gradient(regularizer):
    logits = torch.randn(3, 4, 8)
    labels = torch.full((3, 4), -100)
    kwargs = REGULARIZER_KWARGS[regularizer]
    for num_items in (None, 0, torch.tensor(0)):
        loss, grad = loss_and_grad(label_regularized_loss, logits, labels, num_items_in_batch=num_items,
                                   **kwargs)
        assert loss.item() == 0.0
        assert torch.all(grad == 0)


# --- numerics ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_low_precision_logits_compute_in_float32(dtype, regularizer):
    torch.manual_seed(8)
    logits = (torch.randn(33, 257) * 5).to(dtype)
    labels = torch.randint(0, 257, (33,))
    kwargs = REGULARIZER_KWARGS[regularizer]
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels, **kwargs)
    assert loss.dtype == torch.float32
    assert grad.dtype == dtype
    # Same values as float32 logits holding the same (rounded) numbers.
    ref, ref_grad = loss_and_grad(reference_label_regularized_loss, logits.double(), labels, **kwargs)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5 / 33, rtol=1e-2)


def test_large_vocabulary_256k():
    torch.manual_seed(9)
    k = 256_000
    logits = torch.randn(3, k).bfloat16()
    labels = torch.tensor([0, k - 1, -100])
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels)
    ref, ref_grad = loss_and_grad(reference_label_regularized_loss, logits.double(), labels)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-7, rtol=1e-2)


@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_extreme_logits(regularizer):
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 1e4, -1e4], [1e4, 1e4 - 1, -1e4, -1e4]])
    labels = torch.tensor([0, 2, 1])
    kwargs = REGULARIZER_KWARGS[regularizer]
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels, **kwargs)
    ref, ref_grad = loss_and_grad(reference_label_regularized_loss, logits.double(), labels, **kwargs)
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


def test_extreme_label_logit_keeps_labo_target_exact():
    # The label dominates by 2e4: shifted exponentials of the other classes all underflow,
    # yet u* is still the tempered softmax of the non-target logits.
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0]])
    labels = torch.tensor([0])
    u = labo_target(logits, labels, temperature=1.0)
    expected = torch.softmax(torch.tensor([-1e4, 0.0, 5.0], dtype=torch.float64), dim=0)
    torch.testing.assert_close(u[0, 1:].double(), expected, atol=1e-7, rtol=0)
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels, alpha=0.1, temperature=1.0)
    # p = e_y to float precision, so grad = p - q = -0.1 (u* - e_y restricted appropriately).
    torch.testing.assert_close(grad[0, 1:].double(), -0.1 * expected, atol=1e-7, rtol=0)


def test_masked_classes_get_no_labo_mass():
    logits = torch.tensor([[2.0, -math.inf, 1.0, 0.0], [0.5, 1.0, -math.inf, -math.inf]])
    labels = torch.tensor([0, 1])
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels)
    ref, ref_grad = loss_and_grad(reference_label_regularized_loss, logits.double(), labels)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-7, rtol=0)
    assert grad[0, 1] == 0 and grad[1, 2] == 0 and grad[1, 3] == 0


def test_row_with_every_non_target_logit_minus_inf():
    logits = torch.tensor([[3.0, -math.inf, -math.inf], [1.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1])
    loss, grad = loss_and_grad(label_regularized_loss, logits, labels)
    # The degenerate row has p = e_y and nowhere to put smoothing mass: loss 0, gradient 0.
    second_row = reference_label_regularized_loss(logits[1:], labels[1:])
    assert loss.item() == pytest.approx(second_row.item() / 2, rel=1e-6)
    assert torch.all(grad[0] == 0)
    assert torch.isfinite(grad).all()
    assert torch.all(labo_target(logits, labels)[0] == 0)


def test_label_smoothing_with_minus_inf_logits_is_an_error():
    logits = torch.tensor([[2.0, -math.inf, 1.0]])
    with pytest.raises(ValueError, match="label smoothing puts mass on every class"):
        label_regularized_loss(logits, torch.tensor([0]), regularizer="label_smoothing")


# --- labo_target and the fused rows -------------------------------------------------------

def test_labo_target_shape_dtype_and_rows():
    torch.manual_seed(10)
    logits = torch.randn(2, 3, 6).bfloat16()
    labels = torch.tensor([[0, 5, -100], [2, -100, 1]])
    u = labo_target(logits, labels, temperature=0.7)
    assert u.shape == logits.shape and u.dtype == torch.float32
    assert torch.all(u[0, 2] == 0) and torch.all(u[1, 1] == 0)
    kept = labels != -100
    torch.testing.assert_close(u.sum(-1)[kept], torch.ones(int(kept.sum())))
    assert u[0, 0, 0] == 0 and u[0, 1, 5] == 0 and u[1, 0, 2] == 0


def test_evaluation_skips_gradient_buffer():
    torch.manual_seed(11)
    logits = torch.randn(5, 10)
    labels = torch.randint(0, 10, (5,))
    rows = fused_rows(torch_rows, logits, labels, regularizer="labo", alpha=0.1, temperature=2.0,
                      ignore_index=-100, grad_scale=1.0, want_grad=False)
    assert rows.grad is None
    with torch.no_grad():
        value = label_regularized_loss(logits.requires_grad_(), labels)
    assert not value.requires_grad
    assert value.item() == pytest.approx(rows.loss.mean().item(), rel=1e-6)


def test_upstream_gradient_scales_the_stored_gradient():
    torch.manual_seed(12)
    logits = torch.randn(4, 7)
    labels = torch.randint(0, 7, (4,))
    _, grad = loss_and_grad(label_regularized_loss, logits, labels)
    x = logits.clone().requires_grad_(True)
    (3.0 * label_regularized_loss(x, labels)).backward()
    torch.testing.assert_close(x.grad, 3.0 * grad)


def test_second_backward_through_the_same_forward_accumulates():
    # The gradient is recomputed from the logits in backward (nothing is scaled in place), so a
    # retained graph can be walked twice; the second walk adds the same gradient again.
    x = torch.randn(2, 4, requires_grad=True)
    loss = label_regularized_loss(x, torch.tensor([0, 1]))
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once)


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regularizer": "focal"}, "regularizer must be one of"),
        ({"alpha": 1.0}, "alpha must be in"),
        ({"alpha": -0.1}, "alpha must be in"),
        ({"alpha": float("nan")}, "alpha must be in"),
        ({"temperature": 0.0}, "temperature must be finite and > 0"),
        ({"temperature": -1.0}, "temperature must be finite and > 0"),
        ({"temperature": float("inf")}, "temperature must be finite and > 0"),
        ({"regularizer": "cross_entropy", "alpha": 0.1}, "alpha=0.1 is not used"),
        ({"regularizer": "label_smoothing", "temperature": 2.0}, "temperature=2.0 is only used"),
        ({"implementation": "cuda"}, "implementation must be one of"),
        ({"num_items_in_batch": -1}, "num_items_in_batch must be >= 0"),
        ({"num_items_in_batch": 0}, "num_items_in_batch=0 but labels has kept positions"),
        ({"num_items_in_batch": torch.tensor([1, 2])}, "num_items_in_batch must be a single count"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        label_regularized_loss(torch.randn(2, 3), torch.tensor([0, 1]), **kwargs)


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.randn(2, 3), torch.tensor([0, 1, 2]), "labels shape"),
        (torch.randn(2, 3), torch.tensor([[0, 1]]), "labels shape"),
        (torch.randn(2, 1), torch.tensor([0, 0]), "K >= 2"),
        (torch.tensor(1.0), torch.tensor(0), "K >= 2"),
        (torch.randn(2, 3), torch.tensor([0.0, 1.0]), "labels must be an integer tensor"),
        (torch.randint(0, 3, (2, 3)), torch.tensor([0, 1]), "logits must be a floating-point"),
        (torch.randn(2, 3), torch.tensor([0, 3]), r"labels must be in \[0, 3\)"),
        (torch.randn(2, 3), torch.tensor([0, -1]), r"labels must be in \[0, 3\)"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([0]), "NaN"),
        (torch.tensor([[0.0, float("inf"), 1.0]]), torch.tensor([0]), r"\+inf"),
        (torch.tensor([[-float("inf"), 0.0, 1.0]]), torch.tensor([0]), "-inf at a label"),
    ],
)
def test_bad_inputs_raise_value_error(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        label_regularized_loss(logits, labels)


def test_arguments_are_not_mutated():
    logits = torch.randn(3, 5)
    labels = torch.tensor([1, -100, 4])
    logits_copy, labels_copy = logits.clone(), labels.clone()
    label_regularized_loss(logits.requires_grad_(), labels).backward()
    assert torch.equal(logits.detach(), logits_copy) and torch.equal(labels, labels_copy)


def test_resolve_hyperparameters_defaults():
    assert resolve_hyperparameters("labo", None, None) == (0.1, 2.0)
    assert resolve_hyperparameters("label_smoothing", 0.2, None) == (0.2, None)
    assert resolve_hyperparameters("cross_entropy", None, None) == (0.0, None)
