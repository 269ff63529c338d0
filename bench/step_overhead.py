"""Training-step overhead of LABO on a Marian-base-sized translation model.

Model: MarianMTModel from config (d_model 512, 6+6 layers, 8 heads, FFN 2048, V=58101; the size of
Helsinki-NLP/opus-mt-de-en), random weights. One step = forward, loss, backward, AdamW step, on the
same batches for every loss; the losses are interleaved step by step so that background load hits
them alike, and the median step time is reported. Losses:

* ``torch_ls``  F.cross_entropy(label_smoothing=alpha, ignore_index=-100) on fp32 logits (what
  most training code, and transformers' label smoothing, amounts to): the baseline of the ratios;
* ``torch_ce``  F.cross_entropy without smoothing;
* ``labo`` / ``label_smoothing`` / ``cross_entropy``  labo_hf.loss.functional.label_regularized_loss.

    python bench/step_overhead.py                           # CPU: batch 8 x 32 tokens, 3 steps
    python bench/step_overhead.py --preset gpu              # bf16 autocast, batch 32 x 128 tokens
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import RESULTS_DIR, describe_machine, machine_info, md_table, write_jsonl  # noqa: E402

PRESETS = {
    "cpu": dict(batch_size=8, seq_len=32, steps=3, warmup=1, vocab=58101, d_model=512, layers=6, ffn=2048,
                heads=8, device="cpu"),
    "gpu": dict(batch_size=32, seq_len=128, steps=20, warmup=3, vocab=58101, d_model=512, layers=6, ffn=2048,
                heads=8, device="cuda"),
    "tiny": dict(batch_size=2, seq_len=8, steps=1, warmup=1, vocab=1000, d_model=32, layers=1, ffn=64,
                 heads=2, device="cpu"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="default: gpu if CUDA is available, else cpu")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None, help="source and target length in tokens")
    p.add_argument("--steps", type=int, default=None, help="timed steps per loss (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per loss first")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--d_model", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="encoder and decoder layers each")
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--pad_frac", type=float, default=0.1, help="fraction of target positions that are padding")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--losses", nargs="+", default=["torch_ls", "torch_ce", "labo", "label_smoothing", "cross_entropy"])
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.tag = args.tag or args.preset
    if "torch_ls" not in args.losses:
        args.losses = ["torch_ls", *args.losses]  # the baseline of every ratio
    return args


def build_model(args):
    from transformers import MarianConfig, MarianMTModel

    cfg = MarianConfig(vocab_size=args.vocab, d_model=args.d_model, encoder_layers=args.layers,
                       decoder_layers=args.layers, encoder_attention_heads=args.heads,
                       decoder_attention_heads=args.heads, encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn,
                       max_position_embeddings=max(512, args.seq_len), pad_token_id=args.vocab - 1,
                       decoder_start_token_id=args.vocab - 1, eos_token_id=0, dropout=0.1)
    return MarianMTModel(cfg)


def loss_fns(args):
    from labo_hf.loss.functional import label_regularized_loss

    a, t = args.alpha, args.temperature
    fns = {
        "torch_ls": lambda z, y: F.cross_entropy(z.float().flatten(0, 1), y.flatten(), label_smoothing=a),
        "torch_ce": lambda z, y: F.cross_entropy(z.float().flatten(0, 1), y.flatten()),
        "labo": lambda z, y: label_regularized_loss(z, y, regularizer="labo", alpha=a, temperature=t),
        "label_smoothing": lambda z, y: label_regularized_loss(z, y, regularizer="label_smoothing", alpha=a),
        "cross_entropy": lambda z, y: label_regularized_loss(z, y, regularizer="cross_entropy"),
    }
    return {k: fns[k] for k in args.losses}


def make_batches(args, n, device):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        src = torch.randint(1, args.vocab - 1, (args.batch_size, args.seq_len), generator=g)
        labels = torch.randint(1, args.vocab - 1, (args.batch_size, args.seq_len), generator=g)
        labels[torch.rand(labels.shape, generator=g) < args.pad_frac] = -100
        dec_in = torch.cat([torch.full((args.batch_size, 1), args.vocab - 1), labels[:, :-1]], 1)
        dec_in = dec_in.masked_fill(dec_in == -100, args.vocab - 1)
        batches.append({k: v.to(device) for k, v in
                        dict(input_ids=src, attention_mask=torch.ones_like(src), decoder_input_ids=dec_in,
                             labels=labels).items()})
    return batches


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs CUDA; use --preset cpu")
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    torch.manual_seed(0)
    model = build_model(args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Marian d_model={args.d_model} layers={args.layers}+{args.layers} V={args.vocab}, "
          f"{n_params / 1e6:.1f}M parameters; batch {args.batch_size} x {args.seq_len} tokens")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fns = loss_fns(args)
    batches = make_batches(args, args.warmup + args.steps, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def step(fn, batch):
        with autocast:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=batch["decoder_input_ids"])
        loss = fn(out.logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # .item() synchronizes, like a logging trainer would

    model.train()
    times = {k: [] for k in fns}
    for i, batch in enumerate(batches):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(fn, batch)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
    base = statistics.median(times["torch_ls"])
    records = []
    print(f"\n  {'loss':16s} {'step s':>8s} {'x torch_ls':>10s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rec = dict(loss=name, step_seconds=med, step_seconds_all=ts, ratio_vs_torch_ls=med / base,
                   batch_size=args.batch_size, seq_len=args.seq_len, vocab=args.vocab, d_model=args.d_model,
                   layers=args.layers, params=n_params, device=device.type, alpha=args.alpha,
                   temperature=args.temperature, machine=info)
        records.append(rec)
        print(f"  {name:16s} {med:8.3f} {med / base:10.3f}")
    by = {r["loss"]: r for r in records}
    if "labo" in by and "label_smoothing" in by:
        r = by["labo"]["step_seconds"] / by["label_smoothing"]["step_seconds"]
        print(f"  LABO / LS (both labo_hf): {r:.3f}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / f"step_overhead_{args.tag}.jsonl", records)
    lines = [f"# step_overhead ({args.tag})", "", f"Machine: {describe_machine(info)}.", "",
             f"MarianMTModel from config: d_model {args.d_model}, {args.layers}+{args.layers} layers, V={args.vocab}, "
             f"{n_params / 1e6:.1f}M parameters; batch {args.batch_size} x {args.seq_len} source and target tokens, "
             f"{args.pad_frac:.0%} target padding; forward + loss + backward + AdamW step; median of {args.steps} "
             f"interleaved steps after {args.warmup} warm-up steps per loss. Ratios to torch "
             "F.cross_entropy(label_smoothing) in the same run.", "",
             md_table(["loss", "step s", "× torch LS"],
                      [[r["loss"], f"{r['step_seconds']:.3f}", f"{r['ratio_vs_torch_ls']:.3f}"] for r in records])]
    if "labo" in by and "label_smoothing" in by:
        lines += ["", f"LABO / label_smoothing (both labo_hf): "
                  f"{by['labo']['step_seconds'] / by['label_smoothing']['step_seconds']:.3f}"]
    (args.out_dir / f"step_overhead_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {args.out_dir}/step_overhead_{args.tag}.jsonl and .md")


if __name__ == "__main__":
    main()
