"""Peak memory and step time of a causal-LM training step: full-logits LABO, fused-linear LABO, torch LS.

Model: LlamaForCausalLM from config with a Llama-3-sized vocabulary (V=128256) and tiny depth (1 layer, hidden
512, untied lm_head), random weights; batch 2 x 1024 tokens, 10% of the labels ignored. One step = forward, loss,
backward, plain SGD step. Each method runs in a fresh subprocess, so one method's allocations cannot hide in
another's high-water mark. Methods:

* ``labo_full``   ``labo_loss_func`` on the model's (B, T, V) logits (`label_regularized_loss`);
* ``labo_fused``  ``labo_loss_func(fused_linear=True)``: hidden states and lm_head weight, never the logits;
* ``torch_ls``    ``F.cross_entropy(label_smoothing=alpha)`` on the float32 logits (the usual baseline);
* ``liger_ls``    (CUDA with liger-kernel installed) Liger's fused linear cross-entropy with label smoothing.

Memory on CPU, alike for every method: the process's resident-set high-water mark (VmHWM) over the timed steps;
the same less the file-backed resident pages (library code), i.e. the heap memory at the peak; and the peak minus
the resident set just before the first timed step, after the warm-up's freed memory was returned to the OS
(what the step itself adds: activations, logits, gradients). On CUDA: ``torch.cuda.max_memory_allocated``.

    python bench/lm_memory.py                 # CPU preset
    python bench/lm_memory.py --preset gpu    # bf16 model, batch 4 x 4096, + liger_ls if installed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, describe_machine, machine_info, md_table, write_jsonl  # noqa: E402

METHODS = ("labo_full", "labo_fused", "torch_ls", "liger_ls")
PRESETS = {
    "cpu": dict(batch_size=2, seq_len=1024, vocab=128256, hidden=512, layers=1, steps=3, warmup=1, device="cpu",
                dtype="float32", rounds=2),
    "gpu": dict(batch_size=4, seq_len=4096, vocab=128256, hidden=2048, layers=2, steps=10, warmup=2, device="cuda",
                dtype="bfloat16", rounds=1),
    "tiny": dict(batch_size=2, seq_len=16, vocab=1000, hidden=32, layers=1, steps=1, warmup=1, device="cpu",
                 dtype="float32", rounds=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="default: gpu if CUDA is available, else cpu")
    for name in ("batch_size", "seq_len", "vocab", "hidden", "layers", "steps", "warmup"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="default: all but liger_ls on CPU; all four on CUDA")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None,
                   help="processes per method, run method after method in turn; the fastest step over all counts")
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="result file suffix (default: the preset)")
    p.add_argument("--note", default="", help="appended to the machine line of the Markdown (e.g. other load)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preset is None:
        import torch

        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ---- worker: one method in its own process ----


def _clear_high_water_mark() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current resident set (Linux).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _release_free_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=
        args.seq_len, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype)).train()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
    labels = input_ids.clone()
    labels[torch.rand(labels.shape, generator=g) < 0.1] = -100
    return model, input_ids.to(args.device), labels.to(args.device)


def _step_function(args, model, labels):
    import torch.nn.functional as F

    from labo_hf import labo_loss_func

    kwargs = {"regularizer": "labo", "alpha": args.alpha, "temperature": args.temperature}
    if args.worker == "labo_full":
        loss_fn = labo_loss_func(**kwargs, shift_labels=True)
        return lambda ids: loss_fn(model(input_ids=ids), labels)
    if args.worker == "labo_fused":
        loss_fn = labo_loss_func(**kwargs, shift_labels=True, fused_linear=True, model=model)

        def fused(ids):
            loss = loss_fn(model(input_ids=ids), labels)
            if not loss_fn.last_fused:
                raise RuntimeError("the fused linear loss did not run")
            return loss

        return fused
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    if args.worker == "torch_ls":
        return lambda ids: F.cross_entropy(model(input_ids=ids).logits.float().reshape(-1, args.vocab), targets,
                                           label_smoothing=args.alpha)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss(label_smoothing=args.alpha)

    def liger_step(ids):
        hidden = model.model(input_ids=ids).last_hidden_state
        return liger(model.lm_head.weight, hidden.reshape(-1, args.hidden), targets)

    return liger_step


def run_worker(args) -> dict:
    import torch
    import transformers  # noqa: F401  (imported before measuring the runtime's own memory)

    import labo_hf  # noqa: F401

    runtime = 0 if args.device.startswith("cuda") else _status_bytes("VmRSS")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, input_ids, labels = _build(args)
    step_loss = _step_function(args, model, labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        loss = step_loss(input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        # Every method alike: give the warm-up's freed heap memory back to the OS (glibc keeps it resident
        # otherwise), so that 'before' is the memory in use, then restart the high-water mark for the timed steps.
        _release_free_memory()
        _clear_high_water_mark()
        before = _status_bytes("VmRSS")
        file_before = _status_bytes("RssFile")
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    result = {"method": args.worker, "peak_bytes": peak, "step_peak_bytes": peak - before, "before_bytes": before,
              "runtime_bytes": runtime, "times": times, "loss": losses[-1],
              "parameters": sum(p.numel() for p in model.parameters())}
    if not cuda:
        # The resident set also counts file-backed pages (the code of torch's libraries), which no tensor uses.
        # They only grow, so the peak minus their count at the end is the anonymous (heap) memory at the peak,
        # give or take pages first touched after it: the CPU counterpart of max_memory_allocated.
        file_after = _status_bytes("RssFile")
        result.update(file_before_bytes=file_before, file_after_bytes=file_after, peak_anon_bytes=peak - file_after)
    return result


# ---- parent ----


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return []
    cuda = args.device.startswith("cuda")
    methods = args.methods or [m for m in METHODS if cuda or m != "liger_ls"]
    info = machine_info()
    if args.threads:
        info["torch_threads"] = args.threads  # the workers', not this parent's
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    # Round-robin, so that load from other jobs on a shared machine hits every method alike.
    for _ in range(args.rounds):
        for method in methods:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--preset", args.preset]
            for key in ("batch_size", "seq_len", "vocab", "hidden", "layers", "steps", "warmup", "dtype", "alpha",
                        "temperature", "threads"):
                if getattr(args, key) is not None:
                    cmd += [f"--{key}", str(getattr(args, key))]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ})
            if done.returncode != 0:
                raise RuntimeError(f"{method} failed:\n{done.stderr[-4000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs[method].append(run)
            print(f"{method:11s} peak {run['peak_bytes'] / 2**20:8.0f} MiB  step adds "
                  f"{run['step_peak_bytes'] / 2**20:8.0f} MiB  steps {' '.join(f'{t:.2f}' for t in run['times'])} s")
    records = []
    for method, method_runs in runs.items():
        times = sorted(t for run in method_runs for t in run["times"])
        record = {
            "method": method, "peak_bytes": max(run["peak_bytes"] for run in method_runs),
            "step_peak_bytes": max(run["step_peak_bytes"] for run in method_runs),
            "runtime_bytes": max(run["runtime_bytes"] for run in method_runs),
            "before_bytes": max(run["before_bytes"] for run in method_runs),
            "step_seconds": times[0], "median_step_seconds": times[len(times) // 2], "times": times,
            "loss": method_runs[-1]["loss"], "parameters": method_runs[-1]["parameters"], "rounds": args.rounds,
            "machine": info,
        }
        if not cuda:
            record["peak_anon_bytes"] = max(run["peak_anon_bytes"] for run in method_runs)
            record["file_bytes"] = max(run["file_after_bytes"] for run in method_runs)
        record.update({key: getattr(args, key) for key in ("preset", "batch_size", "seq_len", "vocab", "hidden",
                                                          "layers", "dtype", "device", "steps", "warmup")})
        records.append(record)
    base = next((r for r in records if r["method"] == "labo_full"), records[0])
    for r in records:
        r["peak_ratio_vs_labo_full"] = r["peak_bytes"] / base["peak_bytes"]
        r["step_peak_ratio_vs_labo_full"] = r["step_peak_bytes"] / max(base["step_peak_bytes"], 2**20)
        r["time_ratio_vs_labo_full"] = r["step_seconds"] / base["step_seconds"]
        r["median_time_ratio_vs_labo_full"] = r["median_step_seconds"] / base["median_step_seconds"]
        if not cuda:
            r["peak_anon_ratio_vs_labo_full"] = r["peak_anon_bytes"] / base["peak_anon_bytes"]
    tag = args.tag or args.preset
    write_jsonl(args.out_dir / f"lm_memory_{tag}.jsonl", records)
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    rows = [[r["method"], mib(r["peak_bytes"]), f"{r['peak_ratio_vs_labo_full']:.2f}"]
            + ([] if cuda else [mib(r["peak_anon_bytes"]), f"{r['peak_anon_ratio_vs_labo_full']:.2f}"])
            + [mib(r["before_bytes"]), mib(r["step_peak_bytes"]), f"{r['step_peak_ratio_vs_labo_full']:.2f}",
               f"{r['step_seconds']:.2f}", f"{r['time_ratio_vs_labo_full']:.2f}", f"{r['median_step_seconds']:.2f}",
               f"{r['median_time_ratio_vs_labo_full']:.2f}", f"{r['loss']:.4f}"] for r in records]
    header = (["method", "peak MiB", "× labo_full"] + ([] if cuda else ["peak anon MiB", "× labo_full"])
              + ["before MiB", "step adds MiB", "× labo_full", "fastest step s", "× labo_full", "median step s",
                 "× labo_full", "loss"])
    if cuda:
        memory = ("torch.cuda.max_memory_allocated; 'before' is the memory allocated just before the timed steps and "
                  "'step adds' the peak minus it")
    else:
        memory = (
            "the resident-set high-water mark (VmHWM) over the timed steps; 'peak anon' is the same less the "
            "file-backed resident pages (the code of torch and its libraries; "
            f"{min(r['file_bytes'] for r in records) / 2**20:.0f}-{max(r['file_bytes'] for r in records) / 2**20:.0f}"
            " MiB), i.e. the heap memory at the peak, the CPU counterpart of max_memory_allocated. 'before' is the "
            "resident set just before the timed steps, after the warm-up's freed memory was returned to the OS "
            "(gc.collect + malloc_trim, in every method), and 'step adds' the peak minus it"
        )
    text = (
        f"# lm_memory ({tag})\n\nMachine: {describe_machine(info)}.{' ' + args.note if args.note else ''}\n\n"
        f"LlamaForCausalLM from config: {args.layers} layer(s), hidden {args.hidden}, V={args.vocab}, "
        f"{base['parameters'] / 1e6:.1f}M parameters, {args.dtype}; batch {args.batch_size} x {args.seq_len} tokens, "
        f"10% of labels ignored; forward + loss + backward + SGD step; the same model, batch, dtype and measurement "
        f"for every method. {args.steps} timed step(s) after {args.warmup} warm-up step(s) in each of {args.rounds} "
        f"fresh process(es) per method, methods run in turn (round-robin). Memory: {memory}; each the largest over "
        "the processes. Times: the fastest and the median of all timed steps of a method. The process's memory "
        f"after importing torch, transformers and labo_hf, before building the model, was "
        f"{base['runtime_bytes'] / 2**20:.0f} MiB.\n\n"
        + md_table(header, rows)
        + "\n"
    )
    fused = next((r for r in records if r["method"] == "labo_fused"), None)
    if fused is not None and base["method"] == "labo_full":
        anon = "" if cuda else f", heap memory at the peak {fused['peak_anon_ratio_vs_labo_full']:.2f}x"
        text += (
            f"\nFused-linear vs full-logits LABO: peak memory {fused['peak_ratio_vs_labo_full']:.2f}x{anon}, the "
            f"step's own memory {fused['step_peak_ratio_vs_labo_full']:.2f}x; step time "
            f"{fused['time_ratio_vs_labo_full']:.2f}x (fastest steps), {fused['median_time_ratio_vs_labo_full']:.2f}x "
            "(medians) (goal: at most 0.5x the memory at at most 1.3x the time).\n"
        )
    (args.out_dir / f"lm_memory_{tag}.md").write_text(text)
    print(text)
    return records


if __name__ == "__main__":
    main()
