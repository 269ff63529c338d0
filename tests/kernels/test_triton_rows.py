"""Tests for the fused Triton kernels (labo_hf/kernels/triton_rows.py, through tests/_fused_rows.py).

Interpreter tests run the kernel on CPU tensors through the Triton interpreter on small
shapes with a small block, so that K is never a multiple of the block. Triton fixes its mode
(interpreter or compiled) when it is first imported, so:

* ``TRITON_INTERPRET=1 pytest tests/kernels/test_triton_rows.py`` runs them in-process;
* a plain ``pytest`` run (triton possibly imported already by other test modules, and the
  environment of other tests left untouched) runs them in one subprocess with
  TRITON_INTERPRET=1 via test_interpreter_suite_in_subprocess.

The GPU test runs only with CUDA in compiled mode. Everything is compared with an
independent float64 autograd reference written here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed; the fused Triton kernel is optional")

from _fused_rows import fused_rows  # noqa: E402

from labo_hf.kernels import triton_rows  # noqa: E402
from labo_hf.kernels.triton_rows import INTERPRETED  # noqa: E402


def triton_fused_rows(logits, labels, **kwargs):
    return fused_rows(triton_rows, logits, labels, **kwargs)



IGNORE = -100
REGULARIZERS = ("labo", "label_smoothing", "cross_entropy")
ROOT = Path(__file__).resolve().parents[2]

interpreter_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs under TRITON_INTERPRET=1 (see test_interpreter_suite_in_subprocess)"
)


@pytest.mark.skipif(INTERPRETED, reason="already running in interpreter mode")
def test_interpreter_suite_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def _hyper(regularizer: str) -> tuple[float, float | None]:
    if regularizer == "labo":
        return 0.1, 2.0
    if regularizer == "label_smoothing":
        return 0.1, None
    return 0.0, None


def reference_rows(logits, labels, *, regularizer, alpha, temperature, ignore_index=IGNORE, grad_scale=1.0):
    """Naive float64 reference: (loss, nll, entropy, grad), each per row, grad via autograd.

    logits (N, K) any float dtype, labels (N,). Ignored rows are zero everywhere.
    """
    z = logits.detach().to(torch.float64).requires_grad_(True)
    n, k = z.shape
    keep = labels != ignore_index
    safe = torch.where(keep, labels, 0)
    logp = torch.log_softmax(z, dim=-1)
    onehot = torch.nn.functional.one_hot(safe, k).to(torch.float64)
    zd = z.detach()
    if regularizer == "cross_entropy":
        q = onehot
        ent = z.new_zeros(n)
    elif regularizer == "label_smoothing":
        q = (1 - alpha) * onehot + alpha / k
        ent = z.new_full((n,), math.log(k))
    else:
        zt = (zd / temperature).masked_fill(onehot.bool(), float("-inf"))
        has_mass = torch.isfinite(zt).any(dim=-1, keepdim=True)
        u = torch.where(has_mass, torch.softmax(torch.where(has_mass, zt, 0.0), dim=-1), 0.0)
        u = u.masked_fill(~torch.isfinite(zt), 0.0)
        # Degenerate rows: the smoothing mass has nowhere to go, so q = e_y.
        a = torch.where(has_mass, alpha, 0.0)
        q = (1 - a) * onehot + a * u
        ent = -torch.where(u > 0, u * torch.log(u), 0.0).sum(-1)
    # q * logp with q = 0 on a -inf class must contribute 0, not NaN.
    row_loss = -torch.where(q > 0, q * logp, 0.0).sum(-1)
    nll = -logp.gather(1, safe[:, None])[:, 0]
    row_loss = torch.where(keep, row_loss, 0.0)
    (row_loss.sum() * grad_scale).backward()
    zero = z.new_zeros(())
    return (
        row_loss.detach(),
        torch.where(keep, nll.detach(), zero),
        torch.where(keep, ent, zero),
        torch.where(keep[:, None], z.grad, zero),
    )


def _make_case(k: int, dtype: torch.dtype, seed: int = 0):
    """N=7 rows covering: plain, extreme +-1e4, ignored, -inf entries, degenerate, last class."""
    g = torch.Generator().manual_seed(seed)
    n = 7
    logits = torch.randn(n, k, generator=g) * 3
    labels = torch.randint(0, k, (n,), generator=g)
    # row 1: extreme logits, target among the large ones
    logits[1] = (torch.rand(k, generator=g) * 2 - 1) * 1e4
    # rows 2 and 5 ignored (their logits are garbage on purpose: must not matter)
    labels[2] = IGNORE
    labels[5] = IGNORE
    logits[5] = float("nan")
    # row 3: some non-target classes at -inf
    labels[3] = 0
    logits[3, 1::3] = float("-inf")
    # row 4: degenerate for LABO: every non-target logit -inf
    labels[4] = k // 2
    logits[4] = float("-inf")
    logits[4, k // 2] = 1.5
    # row 6: last class as target
    labels[6] = k - 1
    return logits.to(dtype), labels


def _check(out, ref, dtype, *, finite_only_rows=None):
    loss, nll, ent, grad = ref
    assert out.loss.dtype == torch.float32 and out.nll.dtype == torch.float32
    assert out.smoothing_entropy.dtype == torch.float32
    assert out.grad.dtype == dtype and out.grad.shape == grad.shape
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nll.double(), nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.smoothing_entropy.double(), ent, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(out.grad.double(), grad, rtol=1e-5, atol=1e-5)
    else:
        # The kernel computes in fp32 and rounds once to the storage dtype: allow one ulp of
        # that dtype relative to the exact float64 gradient.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.grad.double(), grad, rtol=eps, atol=1e-5)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [5, 33, 130])
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_matches_reference_interpreter(regularizer, k, dtype):
    alpha, temperature = _hyper(regularizer)
    logits, labels = _make_case(k, dtype)
    if regularizer == "label_smoothing":
        # LS puts mass on every class: a -inf logit makes the true loss +inf. Covered in
        # test_label_smoothing_infinite_logit; here keep the -inf row finite for LS.
        logits[3, 1::3] = -30.0
    out = triton_fused_rows(
        logits,
        labels,
        regularizer=regularizer,
        alpha=alpha,
        temperature=temperature,
        ignore_index=IGNORE,
        grad_scale=0.25,
        block_size=16,
    )
    ref = reference_rows(
        logits, labels, regularizer=regularizer, alpha=alpha, temperature=temperature, grad_scale=0.25
    )
    _check(out, ref, dtype)
    assert torch.all(out.grad[2] == 0) and torch.all(out.grad[5] == 0)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
@interpreter_only
def test_tensor_grad_scale_and_fp16(regularizer):
    alpha, temperature = _hyper(regularizer)
    logits, labels = _make_case(33, torch.float16, seed=1)
    logits[1] = logits[1].float().clamp(-60000, 60000).half()  # +-1e4 is representable in fp16
    if regularizer == "label_smoothing":
        logits[3, 1::3] = -30.0
    scale = torch.tensor(1.0 / 3.0)
    out = triton_fused_rows(
        logits,
        labels,
        regularizer=regularizer,
        alpha=alpha,
        temperature=temperature,
        ignore_index=IGNORE,
        grad_scale=scale,
        block_size=8,
    )
    ref = reference_rows(
        logits, labels, regularizer=regularizer, alpha=alpha, temperature=temperature, grad_scale=1.0 / 3.0
    )
    _check(out, ref, torch.float16)


@interpreter_only
@pytest.mark.parametrize("regularizer", ["labo", "label_smoothing"])
def test_vocabulary_256k(regularizer):
    # K = 2**18 with the default 1024-column blocks: fp32 accumulation over 256 steps per lane.
    k = 1 << 18
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, k, generator=g) * 4
    logits[1] = (torch.rand(k, generator=g) * 2 - 1) * 1e4
    labels = torch.tensor([5, k - 1, IGNORE])
    alpha, temperature = _hyper(regularizer)
    out = triton_fused_rows(
        logits.bfloat16(),
        labels,
        regularizer=regularizer,
        alpha=alpha,
        temperature=temperature,
        ignore_index=IGNORE,
        grad_scale=1.0,
    )
    ref = reference_rows(
        logits.bfloat16(), labels, regularizer=regularizer, alpha=alpha, temperature=temperature
    )
    _check(out, ref, torch.bfloat16)


@interpreter_only
def test_default_block_single_step():
    # Default launch: block = next_pow2(K) covers the row in one step.
    logits, labels = _make_case(33, torch.float32, seed=2)
    out = triton_fused_rows(
        logits, labels, regularizer="labo", alpha=0.2, temperature=0.5, ignore_index=IGNORE, grad_scale=1.0
    )
    ref = reference_rows(logits, labels, regularizer="labo", alpha=0.2, temperature=0.5)
    _check(out, ref, torch.float32)


@interpreter_only
def test_label_smoothing_infinite_logit():
    # Uniform smoothing on a -inf class: loss is +inf (as torch's label_smoothing gives), the
    # gradient p - q stays finite.
    logits = torch.tensor([[1.0, float("-inf"), 0.5, -2.0, 3.0]])
    labels = torch.tensor([0])
    out = triton_fused_rows(
        logits,
        labels,
        regularizer="label_smoothing",
        alpha=0.1,
        temperature=None,
        ignore_index=IGNORE,
        grad_scale=1.0,
        block_size=4,
    )
    assert math.isinf(out.loss.item()) and out.loss.item() > 0
    _, _, _, grad = reference_rows(logits, labels, regularizer="label_smoothing", alpha=0.1, temperature=None)
    torch.testing.assert_close(out.grad.double(), grad, rtol=1e-5, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert math.isinf(ce.item())


@interpreter_only
def test_labo_single_class_and_large_temperature():
    # K == 1: LABO is degenerate (q = e_y), loss 0, grad 0.
    out = triton_fused_rows(
        torch.tensor([[2.0]]),
        torch.tensor([0]),
        regularizer="labo",
        alpha=0.1,
        temperature=2.0,
        ignore_index=IGNORE,
        grad_scale=1.0,
    )
    assert out.loss.item() == 0.0 and out.smoothing_entropy.item() == 0.0 and out.grad.abs().max() == 0
    # Very large T: u* -> uniform over the K-1 non-target classes (LS in the alpha/(K-1) form).
    logits, labels = _make_case(33, torch.float32, seed=3)
    logits[1].clamp_(-5, 5)  # extreme logits would need an even larger T
    keep = torch.tensor([0, 1, 6])
    logits, labels = logits[keep].contiguous(), labels[keep]
    out = triton_fused_rows(
        logits,
        labels,
        regularizer="labo",
        alpha=0.1,
        temperature=1e7,
        ignore_index=IGNORE,
        grad_scale=1.0,
        block_size=16,
    )
    k = logits.shape[1]
    onehot = torch.nn.functional.one_hot(labels, k).double()
    q = 0.9 * onehot + 0.1 * (1 - onehot) / (k - 1)
    logp = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(out.loss.double(), -(q * logp).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out.smoothing_entropy.double(),
        torch.full((3,), math.log(k - 1), dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )


@interpreter_only
def test_all_ignored_and_empty():
    logits = torch.randn(3, 10)
    labels = torch.full((3,), IGNORE)
    out = triton_fused_rows(
        logits,
        labels,
        regularizer="labo",
        alpha=0.1,
        temperature=2.0,
        ignore_index=IGNORE,
        grad_scale=1.0,
        block_size=4,
    )
    assert out.loss.abs().sum() == 0 and out.nll.abs().sum() == 0 and out.grad.abs().sum() == 0
    empty = triton_fused_rows(
        torch.randn(0, 10),
        torch.zeros(0, dtype=torch.long),
        regularizer="labo",
        alpha=0.1,
        temperature=2.0,
        ignore_index=IGNORE,
        grad_scale=1.0,
    )
    assert empty.loss.shape == (0,) and empty.grad.shape == (0, 10)


@interpreter_only
def test_out_of_range_label_is_nan_not_oob():
    logits = torch.randn(2, 6)
    labels = torch.tensor([6, 1])
    out = triton_fused_rows(
        logits,
        labels,
        regularizer="labo",
        alpha=0.1,
        temperature=2.0,
        ignore_index=IGNORE,
        grad_scale=1.0,
        block_size=4,
    )
    assert torch.isnan(out.loss[0]) and torch.isnan(out.grad[0]).all()
    assert torch.isfinite(out.loss[1]) and torch.isfinite(out.grad[1]).all()


@interpreter_only
def test_padding_invariance():
    logits, labels = _make_case(33, torch.float32, seed=4)
    kw = dict(
        regularizer="labo", alpha=0.1, temperature=2.0, ignore_index=IGNORE, grad_scale=1.0, block_size=16
    )
    base = triton_fused_rows(logits, labels, **kw)
    padded = triton_fused_rows(
        torch.cat([logits, torch.randn(3, 33)]), torch.cat([labels, torch.full((3,), IGNORE)]), **kw
    )
    assert torch.equal(padded.loss[:7], base.loss) and torch.equal(padded.grad[:7], base.grad)


@interpreter_only
def test_without_grad_and_float64():
    logits, labels = _make_case(33, torch.float64, seed=5)
    kw = dict(
        regularizer="labo", alpha=0.1, temperature=2.0, ignore_index=IGNORE, grad_scale=0.5, block_size=16
    )
    full = triton_fused_rows(logits, labels, **kw)
    ref = reference_rows(logits, labels, regularizer="labo", alpha=0.1, temperature=2.0, grad_scale=0.5)
    _check(full, ref, torch.float64)
    lean = triton_fused_rows(logits, labels, **kw, want_grad=False)
    assert lean.grad is None
    assert torch.equal(lean.loss, full.loss) and torch.equal(lean.smoothing_entropy, full.smoothing_entropy)


@interpreter_only
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_dispatch_through_label_regularized_loss(regularizer):
    # End to end through losses.py's dispatch: implementation="triton" equals "torch".
    from labo_hf.loss.functional import label_regularized_loss_with_stats

    logits, labels = _make_case(33, torch.float32, seed=6)
    logits, labels = logits.reshape(7, 1, 33), labels.reshape(7, 1)
    if regularizer == "label_smoothing":
        logits = logits.clamp(min=-30.0)  # LS loss is +inf with any -inf logit (rows 3 and 4)
    logits[5] = 0.0  # ignored row; NaN there would trip the torch path's finiteness check
    results = {}
    for impl in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        loss, stats = label_regularized_loss_with_stats(
            x, labels, regularizer=regularizer, num_items_in_batch=torch.tensor(9), implementation=impl
        )
        loss.backward()
        results[impl] = (loss.detach(), stats, x.grad)
    (l_t, s_t, g_t), (l_k, s_k, g_k) = results["torch"], results["triton"]
    torch.testing.assert_close(l_k, l_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_k, g_t, rtol=1e-5, atol=1e-6)
    for a, b in zip(s_k, s_t, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rejects_bad_inputs():
    # Argument validation runs before the device check, so this works in either mode.
    kw = dict(regularizer="labo", alpha=0.1, temperature=2.0, ignore_index=IGNORE, grad_scale=1.0)
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="2-D"):
        triton_fused_rows(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="dtype"):
        triton_fused_rows(torch.randn(2, 3).to(torch.complex64), labels, **kw)
    with pytest.raises(ValueError, match="labels"):
        triton_fused_rows(torch.randn(2, 3), torch.zeros(3, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="integer"):
        triton_fused_rows(torch.randn(2, 3), torch.zeros(2), **kw)
    with pytest.raises(ValueError, match="regularizer"):
        triton_fused_rows(torch.randn(2, 3), labels, **{**kw, "regularizer": "kd"})
    with pytest.raises(ValueError, match="temperature"):
        triton_fused_rows(torch.randn(2, 3), labels, **{**kw, "temperature": None})
    with pytest.raises(ValueError, match="alpha"):
        triton_fused_rows(torch.randn(2, 3), labels, **{**kw, "alpha": 1.0})
    with pytest.raises(ValueError, match="block_size"):
        triton_fused_rows(torch.randn(2, 3), labels, **kw, block_size=12)


@pytest.mark.skipif(INTERPRETED, reason="compiled mode only: the interpreter accepts CPU tensors")
def test_rejects_cpu_tensor_in_compiled_mode():
    with pytest.raises(ValueError, match="CUDA"):
        triton_fused_rows(
            torch.randn(2, 3),
            torch.zeros(2, dtype=torch.long),
            regularizer="labo",
            alpha=0.1,
            temperature=2.0,
            ignore_index=IGNORE,
            grad_scale=1.0,
        )


@pytest.mark.skipif(INTERPRETED, reason="compiled mode only")
@pytest.mark.parametrize(
    ("kernel_name", "mode", "dtype"),
    [("forward", 0, "bf16"), ("forward", 1, "fp16"), ("forward", 2, "bf16"), ("forward", 2, "fp32"),
     ("backward", 0, "fp16"), ("backward", 1, "bf16"), ("backward", 2, "bf16"), ("backward", 2, "fp32")],
)
def test_compiles_for_sm90_without_gpu(kernel_name, mode, dtype):
    # The interpreter never runs Triton's compiler, so type errors in compiled-only code paths
    # (scf.if / scf.for lowering) would first show on a GPU. Compile ahead of time for sm_90
    # instead: needs no GPU, only the ptxas that ships with triton. The column count is not
    # specialised (as for K = 58101), yet the main loop must use 16-byte vector accesses.
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from labo_hf.kernels import triton_rows

    kernel = getattr(triton_rows, f"_{kernel_name}_kernel")
    types = {"labels_ptr": "*i64", "logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "n_cols": "i32",
             "stride_row": "i32", "stride_grad_rows": "i32", "ignore_index": "i32"}
    constexprs = {"MODE": mode, "BLOCK": 1024, "VEC": 4 if dtype == "fp32" else 8}
    if kernel_name == "backward":
        constexprs["SAME_LAYOUT"] = True
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "*fp32" if name.endswith("_ptr") else "fp32")
    # torch allocations are 16-byte aligned, which Triton specialises pointers on at launch.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name.endswith("_ptr")}
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": True}
        )
    except (FileNotFoundError, RuntimeError) as err:
        if "ptxas" in str(err).lower():
            pytest.skip(f"no usable ptxas: {err}")
        raise
    ptx = compiled.asm["ptx"]
    assert "ex2.approx" in ptx
    assert re.search(r"ld\.global(\.\w+)*\.v4", ptx), "main loop loads are not vectorised"
    if kernel_name == "backward":
        assert re.search(r"st\.global(\.\w+)*\.v4", ptx), "main loop stores are not vectorised"


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU, compiled mode")
@pytest.mark.parametrize("regularizer", REGULARIZERS)
@pytest.mark.parametrize(("n", "v"), [(8192, 32000), (24, 262144)])
def test_matches_reference_gpu_bf16(regularizer, n, v):
    alpha, temperature = _hyper(regularizer)
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n, v, device="cuda", generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::5] = IGNORE
    logits[1] = ((torch.rand(v, device="cuda", generator=g) * 2 - 1) * 1e4).to(torch.bfloat16)
    if regularizer != "label_smoothing":
        logits[3, 1::3] = float("-inf")
    logits[4] = float("-inf")
    logits[4, labels[4]] = 2.0
    # A device scale of 0.5 (exact in every dtype): 1/n would push every gradient entry
    # below the absolute tolerance and make the gradient check vacuous.
    scale = torch.tensor(0.5, device="cuda")
    out = triton_fused_rows(
        logits,
        labels,
        regularizer=regularizer,
        alpha=alpha,
        temperature=temperature,
        ignore_index=IGNORE,
        grad_scale=scale,
    )
    torch.cuda.synchronize()
    chunk = max(1, (1 << 25) // v)  # float64 reference in row chunks to bound memory
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        ref = reference_rows(
            logits[sl],
            labels[sl],
            regularizer=regularizer,
            alpha=alpha,
            temperature=temperature,
            grad_scale=0.5,
        )
        sub = type(out)(*(t[sl] for t in out))
        _check(sub, ref, torch.bfloat16)
    assert torch.all(out.grad[labels == IGNORE] == 0)
