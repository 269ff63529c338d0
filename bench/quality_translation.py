"""Multi30k translation quality: LABO vs label smoothing vs cross-entropy, from-scratch Marian.

Each run trains through the project's run_translation.py (a subprocess, exactly as a user would run
it: --model_type marian --config_overrides ... --train_tokenizer_vocab_size ...) and is then scored
here, identically for every run:

* BLEU and chrF (sacrebleu, greedy or beam decoding) on Multi30k test_2016_flickr (in domain),
  IWSLT14 test (TED talks, out of domain; its references are lowercased and tokenized, so the
  hypotheses are lowercased before scoring) and WMT newstest2014 (news, out of domain);
  the out-of-domain sets exist only for de<->en;
* token-level NLL and ECE (15 bins, top-1 confidence) of the reference target tokens under
  teacher forcing on test_2016_flickr, plus run_translation.py's eval_nll on Multi30k val.

Mean, std and 95% t-interval over seeds; per-seed paired difference LABO - LS at the same alpha
(same seed = same initialization, tokenizer and data order).

    python bench/quality_translation.py --preset cpu            # ~40 min on 2 shared cores
    python bench/quality_translation.py --preset cpu --sweep    # + LABO T in {1,2,4}, alpha 0.2 (seed 0)
    python bench/quality_translation.py --preset cpu-long       # 12 epochs, LS and LABO (alpha 0.1, T 2), 3 seeds:
                                                                # ~2.5 h on 1 quiet core, ~2.2 h two runs at a time
    python bench/quality_translation.py --preset gpu            # d_model 512, 3+3 layers, full data, 3 seeds + sweep
    python bench/quality_translation.py --preset tiny           # smoke test
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (path set above so the bench runs from a checkout)
    DATA_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    append_jsonl,
    calibration_metrics,
    describe_machine,
    fmt_stat,
    machine_info,
    md_table,
    paired_differences,
    read_jsonl,
    summarize_runs,
)

PRESETS = {
    # 2 CPU cores shared with other jobs, ~45 min: a 2+2-layer d_model-128 Marian, BPE 3000, one epoch
    # over Multi30k (454 steps of 64 pairs), greedy decoding, the out-of-domain sets cut to their first
    # 200 lines. Far from converged: it compares the regularizers early in training, which is all
    # this budget buys (see bench/results/README.md for the exact command used).
    "cpu": dict(
        config="d_model=128,encoder_layers=2,decoder_layers=2,encoder_ffn_dim=256,decoder_ffn_dim=256,"
               "encoder_attention_heads=4,decoder_attention_heads=4,scale_embedding=True,dropout=0.1,"
               "max_position_embeddings=256,share_encoder_decoder_embeddings=True",
        vocab=3000, max_train=None, epochs=1, batch_size=64, lr=1e-3, warmup=0.1, seeds=[0, 1, 2],
        beams=1, ood_max=200, test_max=None, sweep=False, max_len=64),
    # GPU: d_model 512, 3+3 layers (deeper overfits Multi30k's 29k pairs), full data, 30 epochs, beam 4;
    # ~10 min per run on one H100, ~2 h for 3 seeds + the sweep.
    "gpu": dict(
        config="d_model=512,encoder_layers=3,decoder_layers=3,encoder_ffn_dim=2048,decoder_ffn_dim=2048,"
               "encoder_attention_heads=8,decoder_attention_heads=8,scale_embedding=True,dropout=0.3,"
               "max_position_embeddings=256,share_encoder_decoder_embeddings=True",
        vocab=10000, max_train=None, epochs=30, batch_size=128, lr=5e-4, warmup=0.05, seeds=[0, 1, 2],
        beams=4, ood_max=None, test_max=None, sweep=True, max_len=128),
    # The cpu preset trained 12 epochs instead of 1, LS and LABO (alpha 0.1, T 2) only, 3 seeds: the CPU
    # evidence made longer (~25 min per run on a quiet core, 6 runs; see bench/results/README.md).
    "cpu-long": dict(
        config="d_model=128,encoder_layers=2,decoder_layers=2,encoder_ffn_dim=256,decoder_ffn_dim=256,"
               "encoder_attention_heads=4,decoder_attention_heads=4,scale_embedding=True,dropout=0.1,"
               "max_position_embeddings=256,share_encoder_decoder_embeddings=True",
        vocab=3000, max_train=None, epochs=12, batch_size=64, lr=1e-3, warmup=0.1, seeds=[0, 1, 2],
        beams=1, ood_max=200, test_max=None, sweep=False, max_len=64,
        regularizers=["label_smoothing", "labo"]),
    "tiny": dict(
        config="d_model=32,encoder_layers=1,decoder_layers=1,encoder_ffn_dim=64,decoder_ffn_dim=64,"
               "encoder_attention_heads=2,decoder_attention_heads=2,max_position_embeddings=64",
        vocab=300, max_train=64, epochs=1, batch_size=16, lr=1e-3, warmup=0.0, seeds=[0],
        beams=1, ood_max=8, test_max=16, sweep=False, max_len=16),
}

DATASETS = {
    # name -> (folder, file stem, whether references are lowercased)
    "multi30k_test2016": ("multi30k", "test_2016_flickr", False),
    "iwslt14_test": ("iwslt14-de-en", "test", True),
    "newstest2014": ("wmt-newstest-de-en", "newstest2014", False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--direction", choices=["de-en", "en-de", "fr-en"], default="de-en")
    p.add_argument("--regularizers", nargs="+", default=None,
                   help="default: the preset's, else cross_entropy label_smoothing labo")
    p.add_argument("--alpha", type=float, default=0.1, help="smoothing mass shared by LS and LABO")
    p.add_argument("--temperature", type=float, default=2.0, help="LABO temperature of the main comparison")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--sweep", action="store_true", default=None,
                   help="also LABO T in {1,2,4} and LS/LABO at alpha 0.2, first seed unless --sweep_all_seeds")
    p.add_argument("--sweep_all_seeds", action="store_true")
    p.add_argument("--config", default=None, help="--config_overrides for run_translation.py's Marian")
    p.add_argument("--vocab", type=int, default=None, help="--train_tokenizer_vocab_size")
    p.add_argument("--max_train", type=int, default=None, help="first N training pairs (default: preset)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=float, default=None, help="warmup steps, or a fraction of training if < 1")
    p.add_argument("--beams", type=int, default=None)
    p.add_argument("--max_len", type=int, default=None, help="token cap for sources/targets and generation")
    p.add_argument("--ood_max", type=int, default=None, help="first N lines of each out-of-domain test set")
    p.add_argument("--test_max", type=int, default=None, help="first N lines of test_2016_flickr")
    p.add_argument("--max_steps", type=int, default=None, help="cap optimizer steps (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch threads here and in the training process")
    p.add_argument("--data_dir", type=Path, default=DATA_DIR)
    p.add_argument("--work_dir", type=Path, default=RESULTS_DIR / "cache" / "translation",
                   help="trained models (gitignored); the first LABO seed's model is kept for figure_targets.py")
    p.add_argument("--keep_models", action="store_true", help="keep every trained model, not only the first LABO one")
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="result file suffix (default: PRESET_DIRECTION)")
    p.add_argument("--fresh", action="store_true", help="ignore runs already in the results file")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.regularizers = args.regularizers or ["cross_entropy", "label_smoothing", "labo"]
    args.src, args.tgt = args.direction.split("-")
    args.tag = args.tag or f"{args.preset}_{args.direction.replace('-', '')}"
    return args


def run_configs(args) -> list[dict]:
    cfgs = []
    for seed in args.seeds:
        for reg in args.regularizers:
            cfgs.append(dict(seed=seed, regularizer=reg, alpha=0.0 if reg == "cross_entropy" else args.alpha,
                             temperature=args.temperature if reg == "labo" else None))
    if args.sweep:
        for seed in args.seeds if args.sweep_all_seeds else args.seeds[:1]:
            for t in (1.0, 2.0, 4.0):
                cfgs.append(dict(seed=seed, regularizer="labo", alpha=args.alpha, temperature=t))
            for reg in ("label_smoothing", "labo"):
                cfgs.append(dict(seed=seed, regularizer=reg, alpha=0.2,
                                 temperature=args.temperature if reg == "labo" else None))
    seen, out = set(), []
    for c in cfgs:
        key = config_key(c)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def config_key(c: dict) -> str:
    return json.dumps({k: c[k] for k in ("seed", "regularizer", "alpha", "temperature")}, sort_keys=True)


def run_name(c: dict) -> str:
    t = f"_T{c['temperature']:g}" if c["temperature"] is not None else ""
    return f"{c['regularizer']}_a{c['alpha']:g}{t}_s{c['seed']}"


def train(cfg: dict, args, out: Path, progress=None) -> dict:
    """Train one model with run_translation.py in a subprocess; returns its eval_results.json. `progress`, if
    given, receives each line of the run's log as it comes (the training-loss lines show the progress)."""
    mdir = args.data_dir / "multi30k"
    cmd = [sys.executable, str(REPO_ROOT / "run_translation.py"),
           "--model_type", "marian", "--config_overrides", args.config,
           "--train_tokenizer_vocab_size", str(args.vocab),
           "--train_prefix", str(mdir / "train"), "--validation_prefix", str(mdir / "val"),
           "--source_lang", args.src, "--target_lang", args.tgt,
           "--max_source_length", str(args.max_len), "--max_target_length", str(args.max_len),
           "--label_regularizer", cfg["regularizer"],
           "--do_train", "--do_eval", "--per_device_train_batch_size", str(args.batch_size),
           "--per_device_eval_batch_size", "128", "--learning_rate", str(args.lr),
           "--warmup_steps", str(args.warmup), "--lr_scheduler_type", "inverse_sqrt" if args.preset == "gpu"
           else "linear", "--weight_decay", "0.0001", "--num_train_epochs", str(args.epochs),
           "--seed", str(cfg["seed"]), "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "50",
           "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out)]
    if cfg["regularizer"] != "cross_entropy":
        cmd += ["--label_regularizer_alpha", str(cfg["alpha"])]
    if cfg["temperature"] is not None:
        cmd += ["--labo_temperature", str(cfg["temperature"])]
    if args.max_train:
        cmd += ["--max_train_samples", str(args.max_train)]
    if args.max_steps:
        cmd += ["--max_steps", str(args.max_steps)]
    if args.test_max:
        cmd += ["--max_eval_samples", str(args.test_max)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    # A stale folder could be resumed from by run_translation.py: start clean.
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log_lines = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log_lines.append(line)
            if progress is not None:
                progress(line)
    (out.parent / f"{out.name}.log").write_text("".join(log_lines))
    if proc.returncode != 0:
        tail = "".join(log_lines)[-3000:]
        raise RuntimeError(f"run_translation.py failed ({proc.returncode}) for {cfg}; tail:\n{tail}")
    res = json.loads((out / "eval_results.json").read_text()) if (out / "eval_results.json").exists() else {}
    res["train_seconds"] = time.perf_counter() - t0
    return res


def read_lines(path: Path, limit: int | None) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def test_sets(args) -> dict[str, tuple[list[str], list[str], bool]]:
    sets = {}
    for name, (folder, stem, lowercased) in DATASETS.items():
        if name != "multi30k_test2016" and {args.src, args.tgt} != {"de", "en"}:
            continue  # the out-of-domain sets are de-en only
        limit = args.test_max if name == "multi30k_test2016" else args.ood_max
        base = args.data_dir / folder
        src, ref = (read_lines(base / f"{stem}.{lang}.gz", limit) for lang in (args.src, args.tgt))
        sets[name] = (src, ref, lowercased)
    return sets


def evaluate_model(model_dir: Path, args, sets) -> dict:
    """BLEU/chrF on every test set and teacher-forced token NLL/ECE on the in-domain one."""
    import torch
    from sacrebleu.metrics import BLEU, CHRF
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).to(device).eval()
    res = {}
    for name, (src, ref, lowercased) in sets.items():
        hyps = []
        with torch.no_grad():
            for i in range(0, len(src), 64):
                batch = tok(src[i:i + 64], return_tensors="pt", padding=True, truncation=True,
                            max_length=args.max_len).to(device)
                gen = model.generate(**batch, num_beams=args.beams, max_new_tokens=args.max_len, do_sample=False)
                hyps += tok.batch_decode(gen, skip_special_tokens=True)
        if lowercased:
            # IWSLT14 references are lowercased (and tokenized): score lowercased hypotheses.
            hyps = [h.lower() for h in hyps]
        res[f"{name}_bleu"] = BLEU().corpus_score(hyps, [ref]).score
        res[f"{name}_chrf"] = CHRF().corpus_score(hyps, [ref]).score
        res[f"{name}_sample"] = hyps[:3]
    # Teacher-forced target-token NLL and calibration on the in-domain test set.
    src, ref, _ = sets["multi30k_test2016"]
    all_logits, all_labels = [], []
    with torch.no_grad():
        for i in range(0, len(src), 64):
            batch = tok(src[i:i + 64], text_target=ref[i:i + 64], return_tensors="pt", padding=True,
                        truncation=True, max_length=args.max_len)
            labels = batch.pop("labels")
            labels[labels == tok.pad_token_id] = -100
            out = model(**{k: v.to(device) for k, v in batch.items()}, labels=labels.to(device))
            all_logits.append(out.logits.float().cpu().flatten(0, 1))
            all_labels.append(labels.flatten())
    m = calibration_metrics(torch.cat(all_logits), torch.cat(all_labels))
    res.update(test_token_nll=m["nll"], test_token_ece=100 * m["ece"], test_token_acc=100 * m["accuracy"],
               test_tokens=m["num_positions"])
    return res


METRICS = ["multi30k_test2016_bleu", "multi30k_test2016_chrf", "iwslt14_test_bleu", "iwslt14_test_chrf",
           "newstest2014_bleu", "newstest2014_chrf", "eval_nll", "test_token_nll", "test_token_ece"]
SHORT = {"multi30k_test2016_bleu": "M30k BLEU", "multi30k_test2016_chrf": "M30k chrF",
         "iwslt14_test_bleu": "IWSLT BLEU", "iwslt14_test_chrf": "IWSLT chrF",
         "newstest2014_bleu": "nt14 BLEU", "newstest2014_chrf": "nt14 chrF",
         "eval_nll": "val NLL", "test_token_nll": "test NLL", "test_token_ece": "test ECE %"}


def write_report(args, records: list[dict], info: dict) -> Path:
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in records)]
    lines = [f"# quality_translation ({args.tag})", "", f"Machine: {describe_machine(info)}.", "",
             f"Multi30k {args.direction}, from-scratch Marian (`{args.config}`), BPE vocab {args.vocab}, "
             f"first {args.max_train or 29000} training pairs, {args.epochs} epochs, batch {args.batch_size}, "
             f"lr {args.lr}, {'greedy' if args.beams == 1 else f'beam {args.beams}'} decoding. "
             f"Out-of-domain sets: first {args.ood_max or 'all'} lines (IWSLT14 scored lowercased). "
             "NLL in nats per target token (val: run_translation.py's eval_nll on Multi30k val; test: teacher-"
             "forced on test_2016_flickr), ECE on the same test tokens. "
             "Cells: mean ± std [±95% t-interval half-width] over seeds.", ""]
    groups = summarize_runs(records, ["regularizer", "alpha", "temperature"], metrics)
    groups.sort(key=lambda g: (g["alpha"], g["regularizer"], g["temperature"] or 0))
    rows = [[g["regularizer"], g["alpha"], g["temperature"] if g["temperature"] is not None else "-", len(g["seeds"]),
             *[fmt_stat(g[m], 3 if "nll" in m else 2) for m in metrics]] for g in groups]
    lines += [md_table(["regularizer", "alpha", "T", "seeds", *[SHORT[m] for m in metrics]], rows), ""]
    lines += ["Paired difference LABO - LS per seed (same alpha); positive BLEU/chrF and negative NLL/ECE "
              "favour LABO. Cells: mean ± std [±95% half-width] (n seeds).", ""]
    drows = []
    for alpha in sorted({r["alpha"] for r in records if r["regularizer"] == "labo"}):
        for t in sorted({r["temperature"] for r in records if r["regularizer"] == "labo" and r["alpha"] == alpha}):
            cells = []
            for m in metrics:
                d = paired_differences(records, ["alpha"], m,
                                       {"regularizer": "labo", "alpha": alpha, "temperature": t},
                                       {"regularizer": "label_smoothing", "alpha": alpha})
                cells.append(f"{fmt_stat(d, 3 if 'nll' in m else 2)} (n={d['n']})" if d["n"] else "-")
            if any(c != "-" for c in cells):
                drows.append([alpha, t, *cells])
    lines += [md_table(["alpha", "LABO T", *[f"Δ {SHORT[m]}" for m in metrics]], drows), ""]
    md = args.out_dir / f"quality_translation_{args.tag}.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return md


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    sets = test_sets(args)
    out = args.out_dir / f"quality_translation_{args.tag}.jsonl"
    if args.fresh and out.exists():
        out.unlink()
    done = {config_key(r) for r in read_jsonl(out)}
    kept_labo = False
    for cfg in run_configs(args):
        if config_key(cfg) in done:
            print(f"skip (already in {out.name}): {cfg}")
            continue
        model_dir = args.work_dir / args.tag / run_name(cfg)
        print(f"run {cfg}", flush=True)
        train_res = train(cfg, args, model_dir)
        t0 = time.perf_counter()
        rec = {**cfg, **evaluate_model(model_dir, args, sets), "eval_nll": train_res.get("eval_nll"),
               "train_seconds": train_res["train_seconds"], "eval_seconds": time.perf_counter() - t0,
               "direction": args.direction, "preset": args.preset, "config": args.config, "vocab": args.vocab,
               "epochs": args.epochs, "max_train": args.max_train, "machine": info,
               "model_dir": str(model_dir.relative_to(REPO_ROOT)) if model_dir.is_relative_to(REPO_ROOT) else str(model_dir)}
        append_jsonl(out, rec)  # one line per run, so a killed bench keeps what it finished
        print(f"  M30k BLEU {rec['multi30k_test2016_bleu']:.2f} chrF {rec['multi30k_test2016_chrf']:.2f} "
              f"test NLL {rec['test_token_nll']:.3f} ECE {rec['test_token_ece']:.2f}% "
              f"(train {rec['train_seconds']:.0f}s, eval {rec['eval_seconds']:.0f}s)", flush=True)
        keep = args.keep_models or (cfg["regularizer"] == "labo" and not kept_labo)
        kept_labo = kept_labo or cfg["regularizer"] == "labo"
        if not keep:
            shutil.rmtree(model_dir, ignore_errors=True)
        write_report(args, read_jsonl(out), info)
    md = write_report(args, read_jsonl(out), info)
    print(f"\nwrote {out} and {md}")


if __name__ == "__main__":
    main()
