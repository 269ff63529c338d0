"""The loss's gradient and autograd contract: exact under mixed-precision loss scaling, upstream
gradients other than 1, no (N, K) state between forward and backward, torch.compile, and the
clear errors of what is not supported (second derivatives, torch.func, invalid counts, extreme
temperatures and logits), for both implementations.

Triton cases run through the interpreter: in-process under TRITON_INTERPRET=1, else in one
subprocess (test_triton_cases_in_interpreter_subprocess), as tests/kernels/test_triton_rows.py does.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from labo_hf.loss import dispatch
from labo_hf.loss.config import resolve_hyperparameters
from labo_hf.loss.functional import (
    label_regularized_loss,
    label_regularized_loss_per_position,
    label_regularized_loss_with_stats,
)
from labo_hf.loss.modules import LABOLoss
from labo_hf.loss.reference import (
    reference_label_regularized_loss,
    reference_label_regularized_loss_per_position,
    reference_target_distribution,
)
from labo_hf.loss.validation import check_loss_stats

ROOT = Path(__file__).resolve().parents[2]
REGULARIZER_KWARGS = {
    "labo": {"regularizer": "labo", "alpha": 0.1, "temperature": 2.0},
    "label_smoothing": {"regularizer": "label_smoothing", "alpha": 0.1},
    "cross_entropy": {"regularizer": "cross_entropy"},
}

try:
    from labo_hf.kernels.triton_rows import INTERPRETED
except ImportError:  # triton not installed: the Triton cases are skipped
    INTERPRETED = None

IMPLEMENTATIONS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        not INTERPRETED, reason="Triton cases run under TRITON_INTERPRET=1 (see the subprocess test)")),
]


@pytest.mark.skipif(INTERPRETED is None or INTERPRETED, reason="needs triton; already interpreting")
def test_triton_cases_in_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton", str(Path(__file__))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def _grad(fn, logits, labels, grad_output, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels, **kwargs)
    loss.backward(torch.full_like(loss, grad_output))
    return loss.detach(), x.grad


def _rel_l1(got, ref):
    return ((got.double() - ref).abs().sum() / ref.abs().sum()).item()


def _case(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 3
    labels = torch.randint(0, k, (n,), generator=g)
    labels[::9] = -100
    return logits, labels


def _shape(implementation):
    # The interpreter runs one Python loop per program: keep its case small.
    return (256, 4000) if implementation == "torch" else (48, 300)


# --- mixed precision: the gradient is rounded once, after the loss scale -----------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_fp16_gradient_under_grad_scaler_scale(regularizer, implementation):
    # GradScaler's default scale. Before, the gradient was stored in fp16 in the forward pass and
    # multiplied by grad_output.to(fp16) = inf: every entry was NaN.
    logits, labels = _case(*_shape(implementation))
    x = logits.half()
    kwargs = REGULARIZER_KWARGS[regularizer]
    _, grad = _grad(label_regularized_loss, x, labels, 65536.0, implementation=implementation, **kwargs)
    _, ref = _grad(reference_label_regularized_loss, x.double(), labels, 65536.0, **kwargs)
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
    assert _rel_l1(grad, ref) < 2e-3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_fp16_gradient_at_scale_one_matches_torch_autocast_error(regularizer, implementation):
    # At scale 1 entries of size p / N underflow fp16 whoever computes them. torch's autocast
    # cross_entropy (fp32 math, one cast) sets the bar: its error is that of the exact gradient
    # rounded once. Before, the error was 10x torch's.
    logits, labels = _case(*_shape(implementation))
    x = logits.half()
    kwargs = REGULARIZER_KWARGS[regularizer]
    _, grad = _grad(label_regularized_loss, x, labels, 1.0, implementation=implementation, **kwargs)
    _, ref = _grad(reference_label_regularized_loss, x.double(), labels, 1.0, **kwargs)
    assert _rel_l1(grad, ref) <= 1.05 * _rel_l1(ref.half(), ref)
    if regularizer != "labo":  # torch has these two: compare with its autocast error directly
        smoothing = 0.0 if regularizer == "cross_entropy" else 0.1
        _, torch_grad = _grad(lambda z, y: F.cross_entropy(z.float(), y, label_smoothing=smoothing), x, labels,
                              1.0)
        _, torch_ref = _grad(lambda z, y: F.cross_entropy(z, y, label_smoothing=smoothing), x.double(), labels,
                             1.0)
        assert _rel_l1(grad, ref) <= 1.05 * _rel_l1(torch_grad, torch_ref)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("grad_output", [1.0, 65536.0])
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_bf16_gradient_is_one_rounding_of_the_exact_one(regularizer, grad_output, implementation):
    logits, labels = _case(*_shape(implementation))
    x = logits.bfloat16()
    kwargs = REGULARIZER_KWARGS[regularizer]
    _, grad = _grad(label_regularized_loss, x, labels, grad_output, implementation=implementation, **kwargs)
    _, ref = _grad(reference_label_regularized_loss, x.double(), labels, grad_output, **kwargs)
    # One rounding: half a bf16 ulp relative, plus float32 arithmetic where p - q cancels (an
    # absolute term on the scale of coef * (p + q), coef = grad_output / kept count).
    z = x.double()
    p = torch.softmax(z, dim=-1)
    q = reference_target_distribution(z, labels, **kwargs)
    coef = grad_output / int((labels != -100).sum())
    # The Triton interpreter converts float32 to bf16 by truncation (numpy has no bf16; compiled
    # kernels round to nearest even): one rounding is then up to a whole ulp.
    rounding = 2.0**-8 if implementation == "torch" else 2.0**-7
    bound = rounding * ref.abs() + 1e-6 * coef * (p + q) * (labels != -100).unsqueeze(1)
    assert ((grad.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("grad_output", [3.0, 0.0])
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_upstream_gradient_equals_reference(regularizer, grad_output, dtype, implementation):
    if implementation == "triton" and dtype == torch.float64:
        pytest.skip("float64 goes to the torch path (tested there)")
    logits, labels = _case(33, 257, seed=1)
    x = logits.to(dtype)
    kwargs = REGULARIZER_KWARGS[regularizer]
    loss, grad = _grad(label_regularized_loss, x, labels, grad_output, implementation=implementation,
                       num_items_in_batch=torch.tensor(40), **kwargs)
    ref_loss, ref = _grad(reference_label_regularized_loss, x.double(), labels, grad_output,
                          num_items_in_batch=40, **kwargs)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    if grad_output == 0.0:
        assert torch.all(grad == 0)
        return
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    torch.testing.assert_close(grad.double(), ref, rtol=rtol, atol=1e-7 if dtype != torch.float64 else 1e-15)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_row_strided_logits_without_copy(implementation):
    logits, labels = _case(20, 50, seed=2)
    wide = torch.randn(20, 64)
    wide[:, :50] = logits
    strided = wide[:, :50]  # stride(0) = 64: a view, not a copy
    for kwargs in REGULARIZER_KWARGS.values():
        loss, grad = _grad(label_regularized_loss, strided, labels, 1.0, implementation=implementation, **kwargs)
        ref_loss, ref = _grad(label_regularized_loss, logits, labels, 1.0, implementation=implementation, **kwargs)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nothing_of_size_n_by_k_is_kept_for_backward(implementation):
    # Only the logits themselves (an input, alive anyway) and per-row statistics are saved.
    logits, labels = _case(12, 40)
    x = logits.clone().requires_grad_(True)
    loss = label_regularized_loss(x, labels, implementation=implementation)
    saved = _saved_for_backward(loss)
    assert saved, "the op saved nothing: the graph walk missed it"
    for t in saved:
        assert t.dim() <= 1 or t.data_ptr() == x.data_ptr(), tuple(t.shape)


def _saved_for_backward(loss):
    saved, stack, seen = [], [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        saved += list(getattr(node, "saved_tensors", ()) or ())
        stack += [fn for fn, _ in node.next_functions]
    return saved


# --- validation without host syncs --------------------------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("case", "message"),
    [("label", r"labels must be in \[0, 5\)"), ("nan", "NaN"), ("count", "num_items_in_batch=0")],
)
def test_invalid_input_is_poisoned_without_validation_and_raised_with_it(case, message, implementation):
    logits, labels = _case(4, 5)
    labels = labels.clone()
    count = None
    if case == "label":
        labels[1] = 5
    elif case == "nan":
        logits[2, 3] = math.nan
        labels[2] = 0
    else:
        count = torch.tensor(0)
    with pytest.raises(ValueError, match=message):
        label_regularized_loss(logits, labels, num_items_in_batch=count, implementation=implementation,
                               validate=True)
    loss, stats = label_regularized_loss_with_stats(logits, labels, num_items_in_batch=count,
                                                    implementation=implementation, validate=False)
    assert math.isnan(loss.item())
    with pytest.raises(ValueError, match="validate=True"):
        check_loss_stats(stats)
    # Summed with valid calls' statistics (as the Trainer does), the poison survives.
    _, good = label_regularized_loss_with_stats(*_case(4, 5), validate=False)
    with pytest.raises(ValueError):
        check_loss_stats(torch.stack(list(stats)) + torch.stack(list(good)))
    check_loss_stats(good)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize(
    ("count", "message"),
    [(torch.tensor(0), "num_items_in_batch=0 but labels has kept positions"),
     (torch.tensor(-5), "num_items_in_batch must be >= 0"),
     (torch.tensor(float("inf")), "num_items_in_batch must be >= 0 and finite"),
     (torch.tensor(float("nan")), "num_items_in_batch must be >= 0 and finite"),
     (float("inf"), "num_items_in_batch must be >= 0 and finite"),
     (-5, "num_items_in_batch must be >= 0")],
)
def test_num_items_in_batch_is_never_clamped(count, message, validate):
    # Before: tensor(0) and tensor(-5) were clamped to 1 and inf gave a loss of 0.
    logits, labels = _case(6, 7)
    if validate or not isinstance(count, Tensor := torch.Tensor):
        with pytest.raises(ValueError, match=message):
            label_regularized_loss(logits, labels, num_items_in_batch=count, validate=validate)
        return
    assert isinstance(count, Tensor)
    loss, stats = label_regularized_loss_with_stats(logits, labels, num_items_in_batch=count, validate=False)
    assert math.isnan(loss.item())
    with pytest.raises(ValueError):
        check_loss_stats(stats)


def test_zero_count_with_nothing_kept_stays_valid_without_validation():
    logits = torch.randn(3, 5)
    labels = torch.full((3,), -100)
    loss, stats = label_regularized_loss_with_stats(logits, labels, num_items_in_batch=torch.tensor(0),
                                                    validate=False)
    assert loss.item() == 0.0
    check_loss_stats(stats)


# --- extremes -----------------------------------------------------------------------------------

def test_temperature_below_float32_range_is_an_error():
    # Before: 1e-39 silently returned plain cross-entropy.
    with pytest.raises(ValueError, match="temperature=1e-39 is below 1e-30"):
        label_regularized_loss(torch.randn(2, 4), torch.tensor([0, 1]), temperature=1e-39)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_smallest_temperature_is_exact(implementation):
    logits, labels = _case(9, 13, seed=3)
    kwargs = {"regularizer": "labo", "alpha": 0.1, "temperature": 1e-30}
    loss, grad = _grad(label_regularized_loss, logits, labels, 1.0, implementation=implementation, **kwargs)
    ref_loss, ref = _grad(reference_label_regularized_loss, logits.double(), labels, 1.0, **kwargs)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_float32_logits_near_their_limit(regularizer, implementation):
    kwargs = REGULARIZER_KWARGS[regularizer]
    # Representable differences: exact.
    logits = torch.tensor([[1e38, -1e38, 0.0, 5.0], [-1e38, 1e38, 2.0, 0.0]])
    labels = torch.tensor([0, 2])
    ok = regularizer != "label_smoothing"  # LS's sum over classes of 1e38 - (-1e38) overflows
    if ok:
        loss, grad = _grad(label_regularized_loss, logits, labels, 1.0, implementation=implementation, **kwargs)
        ref_loss, ref = _grad(reference_label_regularized_loss, logits.double(), labels, 1.0, **kwargs)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        torch.testing.assert_close(grad.double(), ref, rtol=1e-6, atol=1e-7)
    # A loss beyond float32's range (-log p_y = 6e38): a clear error, not inf.
    with pytest.raises(ValueError, match="overflows float32"):
        label_regularized_loss(torch.tensor([[3e38, -3e38, 0.0]]), torch.tensor([1]),
                               implementation=implementation, **kwargs)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_labo_with_a_label_logit_of_3e38_is_exact(implementation):
    # Non-target logits 0 and 5 below a label at 3e38: z - max z absorbs their difference in
    # float32, so u* must be formed from z - max_nontarget z. The loss, 0.1 * 3e38, is finite.
    logits = torch.tensor([[3e38, -3e38, 0.0, 5.0]])
    labels = torch.tensor([0])
    kwargs = REGULARIZER_KWARGS["labo"]
    loss, grad = _grad(label_regularized_loss, logits, labels, 1.0, implementation=implementation, **kwargs)
    ref_loss, ref = _grad(reference_label_regularized_loss, logits.double(), labels, 1.0, **kwargs)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_float64_logits_of_1e300_are_exact(regularizer):
    # Before: computed in float32, reported as "+inf logits".
    kwargs = REGULARIZER_KWARGS[regularizer]
    logits = torch.tensor([[1e300, 0.0, -1e300], [0.0, 1e300, 2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    if regularizer == "label_smoothing":
        logits = torch.tensor([[1e300, 0.0, 1e300], [0.0, 1e300, 2.0]], dtype=torch.float64)
    loss, grad = _grad(label_regularized_loss, logits, labels, 1.0, **kwargs)
    ref_loss, ref = _grad(reference_label_regularized_loss, logits, labels, 1.0, **kwargs)
    assert loss.dtype == torch.float64 and math.isfinite(loss.item())
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-15)


def test_float64_is_refused_by_the_triton_implementation():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="float64"):
        label_regularized_loss(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]), implementation="triton")


# --- autograd contract ---------------------------------------------------------------------------

def test_second_derivatives_are_a_clear_error():
    # Before: the gradient was silently treated as a constant (a zero Hessian).
    x = torch.randn(3, 5, requires_grad=True)
    loss = label_regularized_loss(x, torch.tensor([0, 1, 4]))
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support second derivatives.*reference_label_regularized_loss"):
        torch.autograd.grad(g.pow(2).sum(), x)


def test_gradient_penalty_through_a_model_is_a_clear_error():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 6)
    inputs = torch.randn(5, 4, requires_grad=True)
    loss = label_regularized_loss(layer(inputs), torch.tensor([0, 1, 2, 3, 4]))
    (g,) = torch.autograd.grad(loss, inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        (loss + g.pow(2).sum()).backward()


def test_first_derivatives_with_create_graph_still_work():
    torch.manual_seed(0)
    x = torch.randn(3, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 4])
    (g,) = torch.autograd.grad(label_regularized_loss(x, labels), x, create_graph=True)
    (ref,) = torch.autograd.grad(reference_label_regularized_loss(x, labels), x)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_reference_path_is_twice_differentiable():
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 3])
    hessian = torch.autograd.functional.hessian(lambda z: reference_label_regularized_loss(z, labels), x)
    assert hessian.abs().sum() > 0


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_are_a_clear_error(transform):
    # Before: torch-internal messages about autograd.Function / data-dependent control flow.
    x = torch.randn(3, 5)
    labels = torch.tensor([0, 1, 4])
    fn = (torch.func.grad(lambda z: label_regularized_loss(z, labels)) if transform == "grad"
          else torch.func.vmap(lambda z: label_regularized_loss(z, labels)))
    arg = x if transform == "grad" else x.expand(2, 3, 5)
    with pytest.raises(ValueError, match="does not support torch.func transforms"):
        fn(arg)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 11))
    inputs = torch.randn(2, 5, 8)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100

    def step(x, y, n):
        loss, stats = label_regularized_loss_with_stats(model(x), y, num_items_in_batch=n)
        return loss, stats.nll_sum

    def run(fn):
        model.zero_grad()
        loss, nll = fn(inputs, labels, torch.tensor(9))
        loss.backward()
        return loss.detach(), nll, [p.grad.clone() for p in model.parameters()]

    eager = run(step)
    # aot_eager traces forward and backward through the ops' fake implementations like Inductor
    # does, without a C++ compile; fullgraph=True fails on any graph break (host syncs included).
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    for a, b in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(a, b)


# --- per-position losses: the same kernels, a per-row upstream gradient ------------------------------

def _weights(n, seed=5):
    # Non-uniform, negative ones included: each row's gradient must get its own scale.
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4 - 1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_per_position_loss_and_gradient_equal_reference(regularizer, dtype, implementation):
    if implementation == "triton" and dtype == torch.float64:
        pytest.skip("float64 goes to the torch path (tested there)")
    n, k = (40, 257) if implementation == "torch" else (24, 130)
    logits, labels = _case(n, k, seed=4)
    x = logits.to(dtype).reshape(4, n // 4, k)  # leading dimensions are kept
    labels = labels.reshape(4, n // 4)
    weights = _weights(n).reshape(labels.shape)
    kwargs = REGULARIZER_KWARGS[regularizer]
    leaf = x.clone().requires_grad_(True)
    got = label_regularized_loss_per_position(leaf, labels, implementation=implementation, **kwargs)
    got.backward(weights.to(got.dtype))
    ref_leaf = x.double().requires_grad_(True)
    ref = reference_label_regularized_loss_per_position(ref_leaf, labels, **kwargs)
    ref.backward(weights)
    assert got.shape == labels.shape and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert leaf.grad.dtype == dtype and leaf.grad.shape == x.shape
    ignored = labels == -100
    assert bool((got[ignored] == 0).all()) and bool((leaf.grad[ignored] == 0).all())
    exact = dtype == torch.float64
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-12 if exact else 1e-5,
                               atol=1e-12 if exact else 1e-6)
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=rtol, atol=1e-15 if exact else 1e-7)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_per_position_fp16_gradient_under_grad_scaler_scale(regularizer, implementation):
    logits, labels = _case(*_shape(implementation))
    x = logits.half()
    kwargs = REGULARIZER_KWARGS[regularizer]
    weights = _weights(labels.numel()).abs() + 0.5
    count = int((labels != -100).sum())

    def weighted(fn, **kw):
        def loss(z, y):
            rows = fn(z, y, **kwargs, **kw)
            return (rows * weights.to(rows.dtype)).sum() / count
        return loss

    _, grad = _grad(weighted(label_regularized_loss_per_position, implementation=implementation), x, labels,
                    65536.0)
    _, ref = _grad(weighted(reference_label_regularized_loss_per_position), x.double(), labels, 65536.0)
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
    assert _rel_l1(grad, ref) < 2e-3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("regularizer", list(REGULARIZER_KWARGS))
def test_reduced_loss_is_the_per_position_loss_with_a_uniform_gradient(regularizer, implementation):
    logits, labels = _case(18, 37, seed=6)
    kwargs = REGULARIZER_KWARGS[regularizer]
    count = int((labels != -100).sum())
    loss, grad = _grad(label_regularized_loss, logits, labels, 1.0, implementation=implementation, **kwargs)
    per_position = lambda z, y: label_regularized_loss_per_position(  # noqa: E731
        z, y, implementation=implementation, **kwargs)
    x = logits.clone().requires_grad_(True)
    rows = per_position(x, labels)
    rows.backward(torch.full_like(rows, 1.0 / count))
    torch.testing.assert_close(rows.sum() / count, loss)
    # One backward kernel: the same upstream gradient per row gives the same bits.
    assert torch.equal(x.grad, grad)
    assert all(t.dim() <= 1 or t.data_ptr() == x.data_ptr() for t in _saved_for_backward(per_position(x, labels)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("case", "message"), [("label", r"labels must be in \[0, 5\)"), ("nan", "NaN")])
def test_per_position_invalid_input_is_poisoned_without_validation_and_raised_with_it(case, message,
                                                                                       implementation):
    logits, labels = _case(4, 5)
    labels = labels.clone()
    bad = 1 if case == "label" else 2
    if case == "label":
        labels[bad] = 5
    else:
        logits[bad, 3] = math.nan
        labels[bad] = 0
    with pytest.raises(ValueError, match=message):
        label_regularized_loss_per_position(logits, labels, implementation=implementation)  # CPU: validates
    x = logits.clone().requires_grad_(True)
    rows = label_regularized_loss_per_position(x, labels, implementation=implementation, validate=False)
    rows.backward(torch.ones_like(rows))
    others = torch.arange(4) != bad
    assert math.isnan(rows[bad].item()) and bool(torch.isfinite(rows[others]).all())
    assert bool(torch.isnan(x.grad[bad]).all()) and bool(torch.isfinite(x.grad[others]).all())


def test_per_position_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 11))
    loss_fn = LABOLoss(reduction="none")
    inputs = torch.randn(2, 5, 8)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    weights = _weights(10).float().reshape(2, 5)

    def step(x, y, w):
        rows = loss_fn(model(x), y)
        return (rows * w).sum(), rows

    def run(fn):
        model.zero_grad()
        loss, rows = fn(inputs, labels, weights)
        loss.backward()
        return loss.detach(), rows.detach(), [p.grad.clone() for p in model.parameters()]

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[:2], eager[:2])
    for a, b in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(a, b)


# --- first-use self-check of the Triton kernels ---------------------------------------------------

class _BrokenTriton:
    @staticmethod
    def forward_rows(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    backward_rows = forward_rows

    @staticmethod
    def supports(logits):
        return True


class _WrongTriton:
    @staticmethod
    def forward_rows(logits, labels, **kwargs):
        from labo_hf.kernels import torch_rows

        stats = torch_rows.forward_rows(logits, labels, **kwargs)
        return stats._replace(loss=stats.loss * 1.01)

    @staticmethod
    def backward_rows(*args, **kwargs):
        from labo_hf.kernels import torch_rows

        return torch_rows.backward_rows(*args, **kwargs)

    @staticmethod
    def supports(logits):
        return True


@pytest.fixture
def fresh_self_check():
    """The self-check results start empty and are forgotten afterwards (public reset, no private state)."""
    dispatch.reset_triton_self_check()
    yield
    dispatch.reset_triton_self_check()


@pytest.mark.parametrize("kernels", [_BrokenTriton, _WrongTriton])
def test_self_check_falls_back_to_torch_and_warns_once(kernels, monkeypatch, fresh_self_check):
    # CPU stands in for a CUDA device: the check is forced on and the "Triton" module replaced.
    monkeypatch.setattr(dispatch, "needs_self_check", lambda device: True)
    monkeypatch.setattr(dispatch, "load_triton_rows", lambda: kernels)
    logits, labels = _case(8, 11)
    with pytest.warns(RuntimeWarning, match="failed its first-use check.*Falling back"):
        loss, grad = _grad(label_regularized_loss, logits, labels, 1.0, implementation="triton")
    ref_loss, ref = _grad(label_regularized_loss, logits, labels, 1.0, implementation="torch")
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref)
    assert dispatch.triton_self_check_results() == {("cpu", "labo", logits.dtype): False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device, regularizer and dtype
        _grad(label_regularized_loss, logits, labels, 1.0, implementation="triton")


@pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1")
def test_self_check_passes_for_the_real_triton_kernels(monkeypatch, fresh_self_check):
    monkeypatch.setattr(dispatch, "needs_self_check", lambda device: True)
    for regularizer, kwargs in REGULARIZER_KWARGS.items():
        hyper = resolve_hyperparameters(regularizer, kwargs.get("alpha"), kwargs.get("temperature"))
        assert dispatch.probe_triton(torch.device("cpu"), torch.bfloat16, regularizer, *hyper) is None


def test_trainer_raises_the_lazy_error_at_its_logging_step(tmp_path):
    # On a GPU the Trainer's loss does not validate eagerly: an invalid batch leaves NaN in the
    # running statistics, and the next training log (a host sync anyway) raises the ValueError.
    from conftest import TASKS, collate, common_args
    from transformers import TrainingArguments

    from labo_hf.hf.trainers import LABOTrainer

    trainer = LABOTrainer(model=TASKS["vit"].make_model(), args=TrainingArguments(**common_args(str(tmp_path))),
                          data_collator=collate)
    _, good = label_regularized_loss_with_stats(torch.randn(2, 3), torch.tensor([0, 2]), validate=False)
    trainer.record_loss_stats(good, "train")
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs["nll"] == pytest.approx(good.nll_sum.item() / 2)
    _, bad = label_regularized_loss_with_stats(torch.randn(2, 3), torch.tensor([0, 7]), validate=False)
    trainer.record_loss_stats(good, "train")
    trainer.record_loss_stats(bad, "train")
    with pytest.raises(ValueError, match="invalid inputs.*validate=True"):
        trainer.log({"loss": 1.0})


def test_kernels_layer_imports_neither_losses_nor_transformers():
    # Dependencies run one way: kernels -> losses -> trainer -> scripts.
    import ast

    for path in sorted((ROOT / "labo_hf" / "kernels").glob("*.py")) + sorted((ROOT / "labo_hf" / "loss").glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add("." * node.level + (node.module or ""))
        assert not any(name.startswith("transformers") for name in imported), path
        if path.parent.name == "kernels":
            assert not any(name.startswith(("labo_hf.loss", "labo_hf.hf")) for name in imported), (path, imported)
