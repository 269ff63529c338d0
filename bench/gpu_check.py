"""GPU check of the fused Triton loss kernels: correctness against the torch path, the N*K > 2**31
case, time and peak memory against torch's native bf16 cross-entropy (and Liger, if installed),
the ratio to the HBM bound, torch.compile, and an optional block/warp sweep.

Run by bench/gpu_check.sh on a GPU (writes bench/results/gpu/); ``--dry_run`` runs every section on
CPU through the Triton interpreter with tiny shapes (the test suite does, so the script cannot rot
between GPU sessions). Must be started with TRITON_INTERPRET=1 for the dry run (Triton fixes its
mode at import), which gpu_check.sh and the test do.

    python bench/gpu_check.py                      # on a GPU, ~3 minutes on an H100/H200
    TRITON_INTERPRET=1 python bench/gpu_check.py --dry_run --out_dir /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import RESULTS_DIR, machine_info, md_table, write_jsonl  # noqa: E402
from loss_speed import HBM_GBPS  # noqa: E402

KWARGS = {
    "labo": {"regularizer": "labo", "alpha": 0.1, "temperature": 2.0},
    "label_smoothing": {"regularizer": "label_smoothing", "alpha": 0.1},
    "cross_entropy": {"regularizer": "cross_entropy"},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Gradient rel. L1 between the two paths: both round the same float32 value once, so they differ by
# at most one ulp where the two float32 values straddle a rounding boundary.
GRAD_TOL = {"fp32": 1e-5, "bf16": 4e-3, "fp16": 2e-3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR / "gpu")
    p.add_argument("--n", type=int, default=None, help="rows for timing")
    p.add_argument("--check_n", type=int, default=None, help="rows for the correctness cases")
    p.add_argument("--vocab", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--sweep", action="store_true", help="also time alternative (BLOCK, num_warps) launches")
    p.add_argument("--no_big", action="store_true", help="skip the N*K > 2**31 case")
    p.add_argument("--hbm_gbps", type=float, default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        defaults = dict(n=12, check_n=12, vocab=[37, 61, 130], repeats=1)
    else:
        defaults = dict(n=8192, check_n=1024, vocab=[32000, 58101, 128256], repeats=10)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def make_case(n, k, dtype, device, seed=0):
    # Generated on the device: a (8192, 128256) randn on the host would take seconds per case.
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, k, generator=g, device=device) * 4
    labels = torch.randint(0, k, (n,), generator=g, device=device)
    labels[::7] = -100
    logits[1, : k // 3] = float("-inf")  # masked classes (fine for labo and ce; LS gives +inf, not used there)
    labels[1] = k - 1  # not a masked class
    logits[2] = (torch.rand(k, generator=g, device=device) * 2 - 1) * 1e4  # extreme but finite logits
    return logits.to(dtype), labels


def loss_and_grad(logits, labels, grad_output, **kwargs):
    from labo_hf.loss.functional import label_regularized_loss

    x = logits.detach().clone().requires_grad_(True)
    loss = label_regularized_loss(x, labels, validate=False, **kwargs)
    loss.backward(torch.full_like(loss, grad_output))
    return loss.detach(), x.grad


def check_correctness(args, device, records):
    """Triton vs the torch path (itself tested against the float64 reference on CPU)."""
    ok = True
    for k in args.vocab:
        for dname, dtype in DTYPES.items():
            for reg, kw in KWARGS.items():
                logits, labels = make_case(args.check_n, k, dtype, device, seed=k)
                if reg == "label_smoothing":
                    logits[1] = 0.0  # LS has an infinite loss with -inf logits
                for go in (1.0, 65536.0):
                    lt, gt = loss_and_grad(logits, labels, go, implementation="triton", **kw)
                    lr, gr = loss_and_grad(logits, labels, go, implementation="torch", **kw)
                    loss_rel = abs(lt.item() - lr.item()) / max(abs(lr.item()), 1e-30)
                    rel_l1 = ((gt.double() - gr.double()).abs().sum() / gr.double().abs().sum()).item()
                    finite = bool(torch.isfinite(gt).all())
                    passed = finite and loss_rel < 1e-5 and rel_l1 < GRAD_TOL[dname]
                    ok &= passed
                    records.append(dict(section="correctness", V=k, N=args.check_n, dtype=dname, regularizer=reg,
                                        grad_output=go, loss_rel_diff=loss_rel, grad_rel_l1=rel_l1,
                                        grad_finite=finite, passed=passed))
                    print(f"  K={k:6d} {dname} {reg:15s} go={go:7.0f}: loss rel {loss_rel:.1e} "
                          f"grad rel L1 {rel_l1:.1e} {'ok' if passed else 'FAIL'}")
    return ok


def check_big(args, device, records):
    """One N*K > 2**31 case: the last rows (offsets past 2**31) against the torch path on the same rows."""
    from labo_hf.kernels import torch_rows, triton_rows

    k = 128256
    n = (1 << 31) // k + 64
    logits = torch.empty(n, k, device=device, dtype=torch.bfloat16)
    logits.normal_(0, 4)
    labels = torch.randint(0, k, (n,), device=device)
    kw = dict(ignore_index=-100, **KWARGS["labo"])
    stats = triton_rows.forward_rows(logits, labels, **kw)
    grad = triton_rows.backward_rows(torch.ones(n, device=device), logits, labels, stats, **kw)
    tail = slice(n - 64, n)
    ref_stats = torch_rows.forward_rows(logits[tail], labels[tail], **kw)
    ref_grad = torch_rows.backward_rows(torch.ones(64, device=device), logits[tail], labels[tail], ref_stats, **kw)
    loss_rel = ((stats.loss[tail] - ref_stats.loss).abs() / ref_stats.loss.abs()).max().item()
    rel_l1 = ((grad[tail].double() - ref_grad.double()).abs().sum() / ref_grad.double().abs().sum()).item()
    passed = loss_rel < 1e-5 and rel_l1 < GRAD_TOL["bf16"]
    records.append(dict(section="big", N=n, V=k, elements=n * k, dtype="bf16", regularizer="labo",
                        loss_rel_diff=loss_rel, grad_rel_l1=rel_l1, passed=passed))
    print(f"  N*K = {n * k} (> 2**31): last 64 rows loss rel {loss_rel:.1e} grad rel L1 {rel_l1:.1e} "
          f"{'ok' if passed else 'FAIL'}")
    del logits, grad
    return passed


def timed(fn, logits, labels, device, repeats):
    """Median ms of forward+backward and peak extra bytes (gradient included, logits excluded)."""
    def once():
        logits.grad = None
        fn(logits, labels).backward()

    for _ in range(2):
        once()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = None
    if device.type == "cuda":
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        once()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    logits.grad = None
    return statistics.median(times) * 1e3, peak


def bench(args, device, records):
    from labo_hf.loss.functional import label_regularized_loss

    methods = {
        "torch_ls_bf16": lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1),
        "torch_ce_bf16": lambda z, y: F.cross_entropy(z, y),
    }
    for reg in KWARGS:
        methods[f"{reg}_triton"] = (lambda z, y, kw=KWARGS[reg]: label_regularized_loss(
            z, y, implementation="triton", validate=False, **kw))
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss(label_smoothing=0.1)
        # Liger writes its gradient into the logits it is given: a clone keeps the caller's logits.
        methods["liger_ls_clone"] = lambda z, y: liger(z.clone(), y)
    except ImportError:
        print("  liger-kernel not installed: skipped")
    gbps = args.hbm_gbps
    if gbps is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gbps = next((v for key, v in HBM_GBPS.items() if key in name), None)
    for k in args.vocab:
        logits, labels = make_case(args.n, k, torch.bfloat16, device)
        logits[1] = 0.0
        logits.requires_grad_(True)
        nbytes = logits.numel() * logits.element_size()
        bound_ms = 2 * nbytes / (gbps * 1e9) * 1e3 if gbps else None  # read the logits, write the gradient
        rows = {}
        for name, fn in methods.items():
            ms, peak = timed(fn, logits, labels, device, args.repeats)
            rows[name] = dict(section="bench", V=k, N=args.n, dtype="bf16", method=name, time_ms=ms, peak_bytes=peak,
                              hbm_bound_ms=bound_ms, hbm_gbps=gbps)
        base = rows["torch_ls_bf16"]
        for r in rows.values():
            r["time_vs_torch_ls_bf16"] = r["time_ms"] / base["time_ms"]
            if r["peak_bytes"] is not None and base["peak_bytes"]:
                r["mem_vs_torch_ls_bf16"] = r["peak_bytes"] / base["peak_bytes"]
            if bound_ms:
                r["x_hbm_bound"] = r["time_ms"] / bound_ms
            records.append(r)
            print(f"  K={k:6d} {r['method']:22s} {r['time_ms']:8.3f} ms  x torch LS {r['time_vs_torch_ls_bf16']:.2f}"
                  + (f"  peak {r['peak_bytes'] / 2**20:8.1f} MiB x {r.get('mem_vs_torch_ls_bf16', 0):.2f}"
                     if r["peak_bytes"] is not None else "")
                  + (f"  x HBM bound {r['x_hbm_bound']:.2f}" if bound_ms else ""))
        del logits


def sweep(args, device, records):
    """Alternative (BLOCK, num_warps) launches of each kernel, to replace the unmeasured table."""
    from labo_hf.kernels import triton_rows

    configs = [(512, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)] if not args.dry_run else [(16, 1)]
    kw = dict(ignore_index=-100, **KWARGS["labo"])
    for k in args.vocab:
        logits, labels = make_case(args.n, k, torch.bfloat16, device)
        ones = torch.ones(args.n, device=device)
        stats = triton_rows.forward_rows(logits, labels, **kw)
        for block, warps in configs:
            for kind in ("forward", "backward"):
                if kind == "forward":
                    call = partial(triton_rows.forward_rows, logits, labels, block_size=block, num_warps=warps, **kw)
                else:
                    call = partial(triton_rows.backward_rows, ones, logits, labels, stats, block_size=block,
                                   num_warps=warps, **kw)
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / args.repeats * 1e3
                default = triton_rows.launch_config(k, kind) == (block, warps)
                records.append(dict(section="sweep", V=k, N=args.n, kernel=kind, block=block, num_warps=warps,
                                    time_ms=ms, default=default))
                print(f"  K={k:6d} {kind:8s} BLOCK={block:5d} warps={warps:2d}: {ms:.3f} ms{'  (default)' if default else ''}")


def check_compile(device, records):
    """torch.compile(fullgraph=True) with Inductor on this device: same loss and gradient as eager."""
    from labo_hf.loss.functional import label_regularized_loss_with_stats

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1000).to(device)
    inputs = torch.randn(4, 9, 16, device=device)
    labels = torch.randint(0, 1000, (4, 9), device=device)

    def step(x, y):
        loss, stats = label_regularized_loss_with_stats(model(x), y, validate=False)
        return loss, stats.nll_sum

    out = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, fullgraph=True,
                                                                  backend="inductor" if device.type == "cuda" else "aot_eager"))):
        model.zero_grad()
        loss, nll = fn(inputs, labels)
        loss.backward()
        out[name] = (loss.detach(), nll, model.weight.grad.clone())
    diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(out["eager"], out["compiled"], strict=True))
    passed = diff < 1e-5
    records.append(dict(section="compile", max_abs_diff=diff, passed=passed))
    print(f"  torch.compile(fullgraph=True) vs eager: max abs diff {diff:.1e} {'ok' if passed else 'FAIL'}")
    return passed


def main(argv=None):
    args = parse_args(argv)
    from labo_hf.kernels import triton_rows
    from labo_hf.loss import dispatch

    if args.dry_run:
        if not triton_rows.INTERPRETED:
            raise SystemExit("--dry_run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; use --dry_run (with TRITON_INTERPRET=1) on CPU")
        device = torch.device("cuda")
    info = machine_info()
    print(f"machine: {info.get('gpu', 'CPU (dry run)')}, torch {info['torch']}")
    records = []
    t0 = time.perf_counter()
    print("correctness (triton vs torch path):")
    ok = check_correctness(args, device, records)
    if args.dry_run or args.no_big:
        print("N*K > 2**31: skipped" + (" in the dry run" if args.dry_run else ""))
    else:
        print("N*K > 2**31:")
        ok &= check_big(args, device, records)
    print("self-check results:", {f"{d}/{r}/{str(t).removeprefix('torch.')}": v
                                  for (d, r, t), v in dispatch.triton_self_check_results().items()} or "(not needed on CPU)")
    print("torch.compile:")
    ok &= check_compile(device, records)
    print("time and peak memory (bf16 logits, forward+backward):")
    bench(args, device, records)
    if args.sweep:
        print("launch sweep:")
        sweep(args, device, records)
    for r in records:
        r["machine"] = info
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tag = "dry_run" if args.dry_run else "gpu"
    write_jsonl(args.out_dir / f"gpu_check_{tag}.jsonl", records)
    write_markdown(args.out_dir / f"gpu_check_{tag}.md", records, info, ok, time.perf_counter() - t0)
    print(f"{'ALL CHECKS PASSED' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t0:.0f} s; "
          f"wrote {args.out_dir}/gpu_check_{tag}.{{jsonl,md}}")
    return 0 if ok else 1


def write_markdown(path, records, info, ok, seconds):
    lines = [f"# gpu_check ({'passed' if ok else 'FAILED'})", "",
             f"Machine: {info.get('gpu', 'CPU dry run (Triton interpreter)')}, torch {info['torch']}; "
             f"{seconds:.0f} s.", ""]
    corr = [r for r in records if r["section"] in ("correctness", "big")]
    lines += ["## Correctness: Triton vs the torch path", "",
              md_table(["section", "V", "dtype", "regularizer", "grad_output", "loss rel diff", "grad rel L1", "ok"],
                       [[r["section"], r["V"], r["dtype"], r["regularizer"], r.get("grad_output", 1.0),
                         f"{r['loss_rel_diff']:.1e}", f"{r['grad_rel_l1']:.1e}", "yes" if r["passed"] else "NO"]
                        for r in corr]), ""]
    bench_rows = [r for r in records if r["section"] == "bench"]
    lines += ["## Time and peak memory, bf16 logits, forward+backward", "",
              "Ratios to torch's native bf16 `F.cross_entropy(label_smoothing=0.1)`; the HBM bound is 2 N K "
              "bytes (read the logits once, write the gradient once) at the device's peak bandwidth.", "",
              md_table(["V", "method", "ms", "x torch LS", "peak MiB", "x torch LS", "x HBM bound"],
                       [[r["V"], r["method"], f"{r['time_ms']:.3f}", f"{r['time_vs_torch_ls_bf16']:.2f}",
                         f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "-",
                         f"{r['mem_vs_torch_ls_bf16']:.2f}" if r.get("mem_vs_torch_ls_bf16") else "-",
                         f"{r['x_hbm_bound']:.2f}" if r.get("x_hbm_bound") else "-"] for r in bench_rows]), ""]
    sweep_rows = [r for r in records if r["section"] == "sweep"]
    if sweep_rows:
        lines += ["## Launch sweep", "", md_table(["V", "kernel", "BLOCK", "warps", "ms", "default"],
                                                 [[r["V"], r["kernel"], r["block"], r["num_warps"],
                                                   f"{r['time_ms']:.3f}", "yes" if r["default"] else ""]
                                                  for r in sweep_rows]), ""]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
