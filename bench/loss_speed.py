"""Forward+backward time and peak memory of the LABO loss vs torch's label-smoothed cross-entropy.

CPU default: float32 logits of shape (4096, 32000).
GPU default: bfloat16 logits, N=8192, V in {32000, 58101, 128256}, plus implementation="triton"
and liger-kernel's fused cross-entropy (if importable), with the HBM roofline printed.

Every ratio is against torch's F.cross_entropy(label_smoothing=alpha) called on the logits in their
own dtype (`torch_ls`: bf16 on the GPU preset, what a bf16 model's loss does; the fp32-upcast call is
also timed, as `torch_ls_fp32`, when the dtype is not fp32), measured in the same run, with the
methods interleaved round by round so that load from other processes hits all alike.

Peak memory:
* CUDA: torch.cuda.max_memory_allocated() minus the bytes allocated before the call.
* CPU: the torch profiler's allocator events (profile_memory=True): every CPU tensor allocation and
  free is recorded with its size; sorting them by time and taking the running sum's maximum gives
  the peak of extra tensor bytes during forward+backward, independent of glibc's caching and of
  other processes. As a cross-check (--rss, on by default on CPU) each method is also run once in
  a fresh subprocess and ru_maxrss minus the resident set before the call is reported; that
  includes everything the process touched (allocator slack, lazily loaded kernels), so it is a
  little larger but independent of torch's own bookkeeping.
Both count the gradient of the logits (same size for every method) and exclude the logits.

    python bench/loss_speed.py                     # CPU fp32 (4096, 32000)
    python bench/loss_speed.py --preset gpu        # bf16, N=8192, three vocab sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402  (path set above so the bench runs from a checkout)
    RESULTS_DIR,
    describe_machine,
    machine_info,
    md_table,
    write_jsonl,
)

# Peak memory bandwidth in GB/s by device-name substring; first match wins (more specific first).
HBM_GBPS = {
    "GH200": 4000,  # before "H200", which its name contains
    "H200": 4800,
    "H100 PCIe": 2000,
    "H100 NVL": 3900,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L40": 864,
    "L4": 300,
    "A10G": 600,
    "A10": 600,
    "RTX 4090": 1008,
    "RTX 3090": 936,
    "V100": 900,
    "T4": 320,
    "MI300X": 5300,
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", "cpu", "gpu", "tiny"], default="auto",
                   help="auto: gpu if CUDA is available else cpu; tiny: a seconds-long smoke run")
    p.add_argument("--device", default=None, help="cpu or cuda (default from the preset)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="logits dtype (cpu: fp32, gpu: bf16)")
    p.add_argument("--n", type=int, default=None, help="number of positions (rows)")
    p.add_argument("--vocab", type=int, nargs="+", default=None, help="vocabulary sizes (columns)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--ignore_frac", type=float, default=0.0,
                   help="fraction of positions labelled ignore_index (padding)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--hbm_gbps", type=float, default=None,
                   help="GPU memory bandwidth in GB/s for the roofline (default: table by device name)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of method names to run")
    p.add_argument("--no_reference", action="store_true", help="skip the naive reference path")
    p.add_argument("--rss", dest="rss", action="store_true", default=None,
                   help="also measure peak RSS in a fresh subprocess per method (CPU)")
    p.add_argument("--no_rss", dest="rss", action="store_false")
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="result file suffix (default: the preset)")
    p.add_argument("--rss_child", default=None, help=argparse.SUPPRESS)  # internal: one method, one V
    args = p.parse_args(argv)

    if args.preset == "auto":
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    presets = {
        "cpu": dict(device="cpu", dtype="fp32", n=4096, vocab=[32000], repeats=7, warmup=2, rss=True),
        "gpu": dict(device="cuda", dtype="bf16", n=8192, vocab=[32000, 58101, 128256], repeats=20, warmup=5,
                    rss=False),
        "tiny": dict(device="cpu", dtype="fp32", n=64, vocab=[500], repeats=2, warmup=1, rss=False),
    }
    for k, v in presets[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.tag is None:
        args.tag = args.preset
    return args


def build_methods(args, device: torch.device):
    """name -> (description, fn(logits, labels) -> scalar loss). Missing optional backends are skipped."""
    from labo_hf.loss.functional import label_regularized_loss

    a, t = args.alpha, args.temperature
    methods = {}
    # Baseline: torch's own call on the logits as they come (native bf16 on a GPU), the cheapest
    # thing a user could run instead; the fp32 upcast is slower and is not the bar.
    methods["torch_ls"] = (f"torch F.cross_entropy(label_smoothing), {args.dtype}",
                           lambda z, y: F.cross_entropy(z, y, label_smoothing=a))
    if args.dtype != "fp32":
        methods["torch_ls_fp32"] = ("torch F.cross_entropy(label_smoothing), fp32 upcast",
                                    lambda z, y: F.cross_entropy(z.float(), y, label_smoothing=a))
    methods["torch_ce"] = (f"torch F.cross_entropy, {args.dtype}", lambda z, y: F.cross_entropy(z, y))

    impls = ["torch"]
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            impls.append("triton")
        except ImportError:
            print("triton not importable: skipping implementation='triton'")
    for impl in impls:
        methods[f"labo_{impl}"] = (f"label_regularized_loss(labo, T={t}), {impl}",
                                   lambda z, y, impl=impl: label_regularized_loss(
                                       z, y, regularizer="labo", alpha=a, temperature=t, implementation=impl))
        methods[f"ls_{impl}"] = (f"label_regularized_loss(label_smoothing), {impl}",
                                 lambda z, y, impl=impl: label_regularized_loss(
                                     z, y, regularizer="label_smoothing", alpha=a, implementation=impl))
        methods[f"ce_{impl}"] = (f"label_regularized_loss(cross_entropy), {impl}",
                                 lambda z, y, impl=impl: label_regularized_loss(
                                     z, y, regularizer="cross_entropy", implementation=impl))
    if not args.no_reference:
        try:
            from labo_hf.loss.reference import reference_label_regularized_loss

            methods["labo_reference"] = ("naive reference (autograd over explicit u*)",
                                         lambda z, y: reference_label_regularized_loss(
                                             z, y, regularizer="labo", alpha=a, temperature=t))
        except ImportError as e:
            print(f"labo_hf.loss.reference not importable ({e}): skipping the reference path")
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            liger = LigerCrossEntropyLoss(label_smoothing=a)
            # Liger writes its gradient into the logits it is given: hand it a clone, as a caller
            # that still needs its logits must (the clone is part of its cost).
            methods["liger_ls"] = ("liger-kernel LigerCrossEntropyLoss(label_smoothing), on a clone",
                                   lambda z, y: liger(z.clone(), y))
        except ImportError:
            print("liger-kernel not importable: skipping it")
    if args.methods:
        unknown = set(args.methods) - set(methods)
        if unknown:
            raise SystemExit(f"unknown/unavailable methods {sorted(unknown)}; available: {sorted(methods)}")
        methods = {k: v for k, v in methods.items() if k in args.methods or k == "torch_ls"}
    return methods


def make_inputs(n, v, args, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Scale 3 gives peaked, realistic-looking softmaxes rather than near-uniform ones.
    logits = (3.0 * torch.randn(n, v, generator=g)).to(device=device, dtype=DTYPES[args.dtype])
    labels = torch.randint(0, v, (n,), generator=g)
    if args.ignore_frac > 0:
        labels[torch.rand(n, generator=g) < args.ignore_frac] = -100
    return logits.requires_grad_(True), labels.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn, logits, labels):
    logits.grad = None
    loss = fn(logits, labels)
    loss.backward()
    return loss


def time_methods(methods, logits, labels, args, device):
    """Median seconds per forward+backward; methods interleaved each round."""
    for fn in (m[1] for m in methods.values()):
        for _ in range(args.warmup):
            fwd_bwd(fn, logits, labels)
    sync(device)
    times = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, (_, fn) in methods.items():
            sync(device)
            t0 = time.perf_counter()
            fwd_bwd(fn, logits, labels)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    logits.grad = None
    return times


def peak_bytes_profiler(fn, logits, labels):
    """Peak extra CPU tensor bytes during one forward+backward, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    logits.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = fn(logits, labels)
        loss.backward()
    del loss
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort()
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    logits.grad = None
    return peak


def peak_bytes_cuda(fn, logits, labels):
    logits.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fn(logits, labels)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del loss
    logits.grad = None
    return peak


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(args):
    """Runs in a fresh process: one forward+backward of one method; prints peak RSS growth in bytes.

    Peak = VmHWM after the call minus VmRSS before it, with the high-water mark reset to the current
    RSS just before the call (writing 5 to /proc/self/clear_refs, Linux >= 4.0). ru_maxrss is not
    usable here: it keeps the parent's high-water mark across fork+exec, and would include the
    transient copies made while creating the logits.
    """
    name, v = args.rss_child.rsplit(":", 1)
    device = torch.device("cpu")
    methods = build_methods(args, device)
    logits, labels = make_inputs(args.n, int(v), args, device)
    fn = methods[name][1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    fwd_bwd(fn, logits, labels)
    peak = _status_bytes("VmHWM")
    print(json.dumps({"rss_peak_bytes": max(0, peak - before)}))


def peak_bytes_rss(name, v, args):
    cmd = [sys.executable, __file__, "--preset", args.preset, "--dtype", args.dtype, "--n", str(args.n),
           "--alpha", str(args.alpha), "--temperature", str(args.temperature),
           "--ignore_frac", str(args.ignore_frac), "--rss_child", f"{name}:{v}"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["rss_peak_bytes"]
    print(f"  rss child for {name} failed: {out.stderr[-500:]}")
    return None


def hbm_bandwidth(args, device):
    if args.hbm_gbps:
        return args.hbm_gbps, "flag"
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, gbps in HBM_GBPS.items():
        if key in name:
            return gbps, f"table ({key})"
    return None, None


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu / --device cuda needs CUDA; use --preset cpu")
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    print(f"preset={args.preset} dtype={args.dtype} N={args.n} V={args.vocab} alpha={args.alpha} "
          f"T={args.temperature} repeats={args.repeats} (median) warmup={args.warmup}")
    methods = build_methods(args, device)
    gbps, gbps_src = hbm_bandwidth(args, device)
    records = []
    for v in args.vocab:
        logits, labels = make_inputs(args.n, v, args, device)
        # Sanity: the fused paths must agree with torch on the value they claim to compute.
        with torch.no_grad():
            ref_ls = F.cross_entropy(logits.float(), labels, label_smoothing=args.alpha).item()
            check = {k: methods[k][1](logits, labels).item() for k in methods if k.startswith("ls_")}
        for k, val in check.items():
            if abs(val - ref_ls) > 1e-3 * max(1.0, abs(ref_ls)):
                # Not fatal: the bench reports timings, but the mismatch is printed so nobody trusts a wrong kernel.
                print(f"  WARNING {k} loss {val:.6f} != torch LS {ref_ls:.6f}  (LS-over-K-1 vs K convention?)")
        times = time_methods(methods, logits, labels, args, device)
        bytes_io = logits.numel() * logits.element_size() * 2  # read logits once + write the gradient once
        bound_ms = bytes_io / (gbps * 1e9) * 1e3 if gbps else None
        base_t = statistics.median(times["torch_ls"])
        rows = {}
        for name, (desc, fn) in methods.items():
            t_med = statistics.median(times[name])
            if device.type == "cuda":
                peak = peak_bytes_cuda(fn, logits, labels)
            else:
                peak = peak_bytes_profiler(fn, logits, labels)
            rows[name] = dict(method=name, desc=desc, V=v, N=args.n, dtype=args.dtype, device=device.type,
                              time_ms=t_med * 1e3, time_ms_all=[x * 1e3 for x in times[name]],
                              time_ratio_vs_torch_ls=t_med / base_t, peak_bytes=peak,
                              alpha=args.alpha, temperature=args.temperature, hbm_bound_ms=bound_ms,
                              hbm_gbps=gbps, hbm_source=gbps_src, logits_bytes=logits.numel() * logits.element_size())
        del logits, labels
        if args.rss and device.type == "cpu":
            for name in methods:
                rows[name]["rss_peak_bytes"] = peak_bytes_rss(name, v, args)
        base_peak = rows["torch_ls"]["peak_bytes"]
        base_rss = rows["torch_ls"].get("rss_peak_bytes")
        for r in rows.values():
            r["mem_ratio_vs_torch_ls"] = r["peak_bytes"] / base_peak if base_peak else None
            if base_rss and r.get("rss_peak_bytes") is not None:
                r["rss_ratio_vs_torch_ls"] = r["rss_peak_bytes"] / base_rss
            if bound_ms:
                r["fraction_of_hbm_bound"] = bound_ms / r["time_ms"]
            r["machine"] = info
            records.append(r)
        print(f"\nV={v}: logits {rows['torch_ls']['logits_bytes'] / 2**20:.0f} MiB"
              + (f"; HBM bound {bound_ms:.3f} ms at {gbps} GB/s ({gbps_src})" if bound_ms else ""))
        print(f"  {'method':18s} {'ms':>9s} {'x torchLS':>9s} {'peak MiB':>9s} {'x torchLS':>9s}"
              + (f" {'rss MiB':>8s} {'x':>6s}" if args.rss and device.type == "cpu" else ""))
        for r in rows.values():
            line = (f"  {r['method']:18s} {r['time_ms']:9.2f} {r['time_ratio_vs_torch_ls']:9.2f} "
                    f"{r['peak_bytes'] / 2**20:9.1f} {r['mem_ratio_vs_torch_ls']:9.2f}")
            if r.get("rss_peak_bytes") is not None:
                line += f" {r['rss_peak_bytes'] / 2**20:8.1f} {r.get('rss_ratio_vs_torch_ls', float('nan')):6.2f}"
            print(line)
        if "labo_torch" in rows:
            lt, lm = rows["labo_torch"]["time_ratio_vs_torch_ls"], rows["labo_torch"]["mem_ratio_vs_torch_ls"]
            verdict = "MET" if lt <= 1.0 and lm <= 0.5 else "NOT MET"
            print(f"  done-criterion (LABO time <= 1.0x, peak memory <= 0.5x of torch LS): {verdict} "
                  f"(time {lt:.2f}x, memory {lm:.2f}x)")

    write_results(records, args, info)


def write_results(records, args, info):
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jl = args.out_dir / f"loss_speed_{args.tag}.jsonl"
    write_jsonl(jl, records)
    lines = [f"# loss_speed ({args.tag})", "",
             f"Machine: {describe_machine(info)}.", "",
             f"Forward+backward of one scalar loss over logits (N={args.n}, V), dtype {args.dtype}, "
             f"alpha={args.alpha}, LABO T={args.temperature}; median of {args.repeats} interleaved rounds "
             f"after {args.warmup} warm-up calls. Ratios are to torch F.cross_entropy(label_smoothing) "
             f"on {args.dtype} logits (torch's native call, no upcast) measured in the same run. Peak memory excludes the logits and includes their gradient.", ""]
    has_rss = any(r.get("rss_peak_bytes") is not None for r in records)
    has_bound = any(r.get("hbm_bound_ms") for r in records)
    header = ["V", "method", "ms", "× torch LS", "peak MiB", "× torch LS"]
    if has_rss:
        header += ["RSS peak MiB", "× torch LS"]
    if has_bound:
        header += ["HBM bound ms", "% of bound"]
    rows = []
    for r in records:
        row = [r["V"], r["method"], f"{r['time_ms']:.2f}", f"{r['time_ratio_vs_torch_ls']:.2f}",
               f"{r['peak_bytes'] / 2**20:.1f}", f"{r['mem_ratio_vs_torch_ls']:.2f}"]
        if has_rss:
            rss = r.get("rss_peak_bytes")
            row += [f"{rss / 2**20:.1f}" if rss is not None else "-",
                    f"{r['rss_ratio_vs_torch_ls']:.2f}" if r.get("rss_ratio_vs_torch_ls") else "-"]
        if has_bound:
            row += [f"{r['hbm_bound_ms']:.3f}", f"{100 * r['fraction_of_hbm_bound']:.0f}%"]
        rows.append(row)
    lines.append(md_table(header, rows))
    lines.append("")
    lines.append("Methods: " + "; ".join(sorted({f"`{r['method']}` = {r['desc']}" for r in records})) + ".")
    md = args.out_dir / f"loss_speed_{args.tag}.md"
    md.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {jl} and {md}")


if __name__ == "__main__":
    main()
