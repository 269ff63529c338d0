"""Figure like Fig. 1 of the LABO paper: the training target at one position of a real sentence.

One-hot (cross-entropy), label smoothing and LABO targets over the top tokens at one target
position of a Multi30k test sentence, for a small Marian model trained on Multi30k. LABO's
smoothing mass follows the model's own ranking of the non-target tokens (e.g. synonyms and
plausible alternatives), label smoothing spreads it evenly over the whole vocabulary.

Model: --model_dir (a model saved by run_translation.py); by default the first LABO model that
bench/quality_translation.py kept under bench/results/cache/translation/, else a small model is
trained here through run_translation.py (--train_steps, about 2 minutes on 2 CPU cores, its progress
printed; the model is kept in that cache folder, which git ignores, for the next call).

Writes the figure to --out (default outputs/figure_targets.png, under the ignored outputs/ folder) and the
numbers next to it (.json). The committed figure of the README is made with:

    python bench/figure_targets.py --temperature 1 --out bench/results/figure_targets_T1.png
    python bench/figure_targets.py --sentence 3 --position 2 --temperature 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, RESULTS_DIR  # noqa: E402  (path set above so the bench runs from a checkout)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", type=Path, default=None)
    p.add_argument("--direction", default="de-en", choices=["de-en", "en-de", "fr-en"])
    p.add_argument("--sentence", type=int, default=0, help="line of Multi30k test_2016_flickr")
    p.add_argument("--position", type=int, default=None,
                   help="target token position (default: where the model's best non-target token is most "
                        "probable, i.e. where dark knowledge is most visible)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--train_steps", type=int, default=600, help="steps when a model has to be trained here")
    p.add_argument("--data_dir", type=Path, default=DATA_DIR)
    p.add_argument("--out", type=Path, default=RESULTS_DIR.parent.parent / "outputs" / "figure_targets.png",
                   help="figure file (PNG); the numbers go next to it as .json")
    return p.parse_args(argv)


def find_or_train_model(args) -> Path:
    if args.model_dir is not None:
        return args.model_dir
    tag = args.direction.replace("-", "")
    cache = RESULTS_DIR / "cache" / "translation"
    found = sorted(cache.glob(f"*_{tag}/labo_*")) if cache.exists() else []
    found = [d for d in found if (d / "config.json").exists()]
    if found:
        return found[0]
    import quality_translation as qt

    qargs = qt.parse_args(["--preset", "cpu", "--direction", args.direction, "--max_steps", str(args.train_steps)])
    out = cache / f"figure_{tag}" / "labo_figure"
    print(f"No trained model found: training one for {args.train_steps} steps into {out} (about 2 minutes on 2 CPU "
          "cores; the training loss every 50 steps below).", flush=True)

    def progress(line: str) -> None:
        if "'loss'" in line or "train_runtime" in line:
            print("  " + line.strip(), flush=True)

    qt.train(dict(seed=0, regularizer="labo", alpha=args.alpha, temperature=args.temperature), qargs, out, progress)
    return out


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from labo_hf.analysis.figures import plot_target_distributions, target_distributions

    model_dir = find_or_train_model(args)
    src_lang, tgt_lang = args.direction.split("-")
    lines = {}
    for lang in (src_lang, tgt_lang):
        with gzip.open(args.data_dir / "multi30k" / f"test_2016_flickr.{lang}.gz", "rt", encoding="utf-8") as f:
            lines[lang] = [line.rstrip("\n") for line in f]
    src, ref = lines[src_lang][args.sentence], lines[tgt_lang][args.sentence]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    batch = tok([src], text_target=[ref], return_tensors="pt")
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, labels=labels).logits[0]
    labels = labels[0]
    probs = torch.softmax(logits.float(), -1)
    if args.position is None:
        # Skip the final </s>: its alternatives are uninteresting.
        others = probs.scatter(1, labels[:, None], 0.0)[:-1]
        position = int(others.max(-1).values.argmax())
    else:
        position = args.position
    dist = target_distributions(logits[position], labels[position], alpha=args.alpha,
                                temperature=args.temperature, top_k=args.top_k)
    names = tok.convert_ids_to_tokens(dist["indices"])
    prefix = tok.convert_ids_to_tokens(labels[:position].tolist())
    title = (f"{src_lang}: {src}\n{tgt_lang} target so far: {' '.join(prefix)} [{names[0]}]  "
             f"(position {position}, V={dist['num_classes']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_target_distributions(dist, token_names=names, title=title, path=str(args.out))
    shown_dir = model_dir.resolve()
    if shown_dir.is_relative_to(RESULTS_DIR.parent.parent):  # keep the committed JSON machine-independent
        shown_dir = shown_dir.relative_to(RESULTS_DIR.parent.parent)
    meta = {"model_dir": str(shown_dir), "sentence": args.sentence, "source": src, "reference": ref,
            "position": position, "tokens": names, **dist}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"source: {src}\nreference: {ref}\nposition {position}, label {names[0]!r}")
    print(f"  {'token':>14s} {'model p':>8s} {'one-hot':>8s} {'LS':>8s} {'LABO':>8s}")
    for i, name in enumerate(names):
        print(f"  {name:>14s} {dist['model'][i]:8.4f} {dist['one_hot'][i]:8.4f} {dist['label_smoothing'][i]:8.4f} "
              f"{dist['labo'][i]:8.4f}")
    print(f"  {'(rest)':>14s} {dist['rest']['model']:8.4f} {0:8.4f} {dist['rest']['label_smoothing']:8.4f} "
          f"{dist['rest']['labo']:8.4f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
