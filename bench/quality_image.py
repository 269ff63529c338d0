"""CIFAR-10 image classification quality: LABO vs label smoothing vs cross-entropy.

Models are built from config (no pretrained weights): a small ResNet
(transformers.ResNetForImageClassification) and a small ViT (ViTForImageClassification), trained
from scratch through labo_hf's LABOTrainer. Reports top-1 accuracy, NLL and ECE on the CIFAR-10
test set (or a fixed subset), mean / std / 95% t-interval over seeds, and the per-seed paired
difference LABO - LS (same seed = same initialization and data order for every regularizer).

The CIFAR-10 zips are decoded once into uint8 tensors under bench/results/cache/ (gitignored).

    python bench/quality_image.py --preset cpu           # subset, ~20-30 min on 2 cores
    python bench/quality_image.py --preset gpu           # full data, more epochs, 3 seeds, sweeps
    python bench/quality_image.py --preset tiny          # smoke test, seconds
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import (  # noqa: E402  (path set above so the bench runs from a checkout)
    DATA_DIR,
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

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Per-channel statistics of the CIFAR-10 training set (standard values).
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)

PRESETS = {
    # 2 shared CPU cores: tiny models, a class-balanced subset, few epochs, one model family
    # with 3 seeds (the ViT is cheap enough to add with 2 seeds).
    "cpu": dict(models=["resnet", "vit"], seeds=[0, 1, 2], train_size=10000, test_size=2000, epochs=4,
                batch_size=128, lr=None, sweep=False, cifar_stem=False, width="small"),
    # ResNet-18-like (CIFAR stem) and a 6-layer ViT, 3 seeds + the sweep: ~2 h on one H100.
    "gpu": dict(models=["resnet", "vit"], seeds=[0, 1, 2], train_size=None, test_size=None, epochs=30,
                batch_size=128, lr=None, sweep=True, cifar_stem=True, width="base"),
    "tiny": dict(models=["resnet", "vit"], seeds=[0], train_size=64, test_size=64, epochs=1,
                 batch_size=32, lr=None, sweep=False, cifar_stem=False, width="tiny"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--models", nargs="+", choices=["resnet", "vit"], default=None)
    p.add_argument("--regularizers", nargs="+", default=["cross_entropy", "label_smoothing", "labo"])
    p.add_argument("--alpha", type=float, default=0.1, help="smoothing mass shared by LS and LABO")
    p.add_argument("--temperature", type=float, default=2.0, help="LABO temperature of the main comparison")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--sweep", action="store_true", default=None,
                   help="also run LABO T in {1,2,4} and alpha 0.2 (LS and LABO), first seed only unless "
                        "--sweep_all_seeds")
    p.add_argument("--sweep_all_seeds", action="store_true")
    p.add_argument("--train_size", type=int, default=None, help="class-balanced training subset (default: preset)")
    p.add_argument("--test_size", type=int, default=None, help="class-balanced test subset (default: preset)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data_dir", type=Path, default=DATA_DIR / "cifar10")
    p.add_argument("--cache_dir", type=Path, default=RESULTS_DIR / "cache")
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="result file suffix (default: the preset)")
    p.add_argument("--fresh", action="store_true", help="ignore runs already in the results file")
    p.add_argument("--max_steps", type=int, default=None, help="cap optimizer steps (smoke tests)")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.tag = args.tag or args.preset
    return args


# ----------------------------------------------------------------------------------------- data
def load_cifar10(split: str, data_dir: Path, cache_dir: Path,
                 per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, 32, 32) and int64 labels, decoded from the zip once and cached.

    per_class: decode only the first N images of each class and cache nothing (smoke tests: decoding
    all 60,000 JPEGs takes about a minute)."""
    cache = cache_dir / f"cifar10_{split}.pt"
    if per_class is None and cache.exists():
        d = torch.load(cache)
        return d["images"], d["labels"]
    from PIL import Image

    images, labels = [], []
    with zipfile.ZipFile(data_dir / f"{split}.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        if per_class is not None:
            names = [n for c in CLASSES for n in [m for m in names if m.split("/")[-2] == c][:per_class]]
        for name in names:
            cls = name.split("/")[-2]
            with Image.open(io.BytesIO(zf.read(name))) as im:
                arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            images.append(arr.view(32, 32, 3).permute(2, 0, 1))
            labels.append(CLASSES.index(cls))
    imgs, labs = torch.stack(images), torch.tensor(labels)
    if per_class is not None:
        return imgs, labs
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"images": imgs, "labels": labs}, cache)
    return imgs, labs


def balanced_subset(labels: torch.Tensor, size: int | None, seed: int = 1234) -> torch.Tensor:
    """Indices of a fixed class-balanced subset (same for every run, so runs are comparable)."""
    if size is None or size >= labels.numel():
        return torch.arange(labels.numel())
    g = torch.Generator().manual_seed(seed)
    per_class = size // 10
    idx = [torch.nonzero(labels == c).squeeze(1)[torch.randperm(int((labels == c).sum()), generator=g)[:per_class]]
           for c in range(10)]
    return torch.cat(idx).sort().values


class CifarDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, augment: bool):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self):
        return self.labels.numel()

    def __getitem__(self, i):
        x = self.images[i].float().div_(255)
        if self.augment:
            # Standard CIFAR augmentation: 4-pixel padded random crop and horizontal flip. torch's
            # global RNG is seeded by the Trainer, so this is reproducible per seed.
            x = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
            dx, dy = torch.randint(0, 9, (2,)).tolist()
            x = x[:, dy:dy + 32, dx:dx + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return {"pixel_values": (x - MEAN) / STD, "labels": self.labels[i]}


# --------------------------------------------------------------------------------------- models
def build_model(kind: str, width: str, cifar_stem: bool):
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    if kind == "resnet":
        sizes = {"tiny": ([16, 32], [1, 1]), "small": ([32, 64, 128], [1, 1, 1]),
                 "base": ([64, 128, 256, 512], [2, 2, 2, 2])}[width]
        cfg = ResNetConfig(num_channels=3, embedding_size=sizes[0][0], hidden_sizes=sizes[0], depths=sizes[1],
                           layer_type="basic", hidden_act="relu", downsample_in_first_stage=False,
                           num_labels=10, id2label=dict(enumerate(CLASSES)),
                           label2id={c: i for i, c in enumerate(CLASSES)})
        model = ResNetForImageClassification(cfg)
        if cifar_stem:
            # The ImageNet stem (7x7/2 conv + 3x3/2 max-pool) shrinks 32x32 inputs to 8x8 before the
            # first stage; the usual CIFAR ResNet uses a 3x3/1 conv and no pool. Off on CPU for speed.
            emb = model.resnet.embedder
            emb.embedder.convolution = torch.nn.Conv2d(3, sizes[0][0], 3, stride=1, padding=1, bias=False)
            emb.pooler = torch.nn.Identity()
        return model
    dims = {"tiny": (64, 2, 2, 128, 8), "small": (128, 4, 4, 256, 4), "base": (384, 6, 6, 1536, 4)}[width]
    hidden, layers, heads, inter, patch = dims
    if width == "small" and not cifar_stem:
        patch = 8  # 16 patches instead of 64: 4x cheaper attention on CPU
    cfg = ViTConfig(image_size=32, patch_size=patch, num_channels=3, hidden_size=hidden,
                    num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                    num_labels=10, id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    return ViTForImageClassification(cfg)


def default_lr(kind: str) -> float:
    # AdamW peak learning rates that train these from-scratch models stably in a few epochs.
    return 2e-3 if kind == "resnet" else 1e-3


# ------------------------------------------------------------------------------------------ runs
def run_configs(args) -> list[dict]:
    """Main comparison (all seeds) + optional sweep (first seed unless --sweep_all_seeds)."""
    cfgs = []
    for model in args.models:
        for seed in args.seeds:
            for reg in args.regularizers:
                cfgs.append(dict(model=model, seed=seed, regularizer=reg,
                                 alpha=0.0 if reg == "cross_entropy" else args.alpha,
                                 temperature=args.temperature if reg == "labo" else None))
        if args.sweep:
            for seed in args.seeds if args.sweep_all_seeds else args.seeds[:1]:
                for t in (1.0, 2.0, 4.0):
                    cfgs.append(dict(model=model, seed=seed, regularizer="labo", alpha=args.alpha, temperature=t))
                for reg in ("label_smoothing", "labo"):
                    cfgs.append(dict(model=model, seed=seed, regularizer=reg, alpha=0.2,
                                     temperature=args.temperature if reg == "labo" else None))
    seen, out = set(), []
    for c in cfgs:  # the sweep repeats the main LABO config: run it once
        key = json.dumps(c, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def config_key(c: dict) -> str:
    return json.dumps({k: c[k] for k in ("model", "seed", "regularizer", "alpha", "temperature")}, sort_keys=True)


def train_and_eval(cfg: dict, args, data) -> dict:
    from labo_hf.hf.arguments import LABOTrainingArguments
    from labo_hf.hf.trainers import LABOTrainer

    train_ds, test_ds = data
    model = _seeded_model(cfg, args)
    lr = args.lr or default_lr(cfg["model"])
    with tempfile.TemporaryDirectory(prefix="labo_img_") as tmp:
        targs = LABOTrainingArguments(
            output_dir=tmp, report_to="none", save_strategy="no", eval_strategy="no",
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=256,
            num_train_epochs=args.epochs, max_steps=args.max_steps or -1, learning_rate=lr,
            weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=0.05, seed=cfg["seed"],
            logging_steps=50, disable_tqdm=True, dataloader_num_workers=4 if torch.cuda.is_available() else 0, use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            label_regularizer=cfg["regularizer"],
            label_regularizer_alpha=None if cfg["regularizer"] == "cross_entropy" else cfg["alpha"],
            labo_temperature=cfg["temperature"],
        )
        trainer = LABOTrainer(model=model, args=targs, train_dataset=train_ds)
        t0 = time.perf_counter()
        train_out = trainer.train()
        train_s = time.perf_counter() - t0
        pred = trainer.predict(test_ds)
    logits = torch.as_tensor(pred.predictions if not isinstance(pred.predictions, tuple) else pred.predictions[0])
    m = calibration_metrics(logits, torch.as_tensor(pred.label_ids))
    return {**cfg, "top1": 100 * m["accuracy"], "nll": m["nll"], "ece": 100 * m["ece"],
            "train_loss": train_out.training_loss, "train_seconds": train_s, "lr": lr, "epochs": args.epochs,
            "train_size": len(train_ds), "test_size": len(test_ds), "preset": args.preset,
            "trainer_metrics": {k: v for k, v in pred.metrics.items() if isinstance(v, int | float)}}


def _seeded_model(cfg, args):
    from transformers import set_seed

    set_seed(cfg["seed"])  # same initialization for every regularizer at a given seed
    return build_model(cfg["model"], args.width, args.cifar_stem)


# --------------------------------------------------------------------------------------- report
METRICS = ["top1", "nll", "ece"]


def write_report(args, records: list[dict], info: dict) -> Path:
    lines = [f"# quality_image ({args.tag})", "",
             f"Machine: {describe_machine(info)}.", "",
             f"CIFAR-10, train subset {args.train_size or 50000}, test subset {args.test_size or 10000} "
             f"(class-balanced, fixed), {args.epochs} epochs, batch {args.batch_size}, AdamW + cosine. "
             f"Cells: mean ± std [±95% t-interval half-width] over seeds. top1 and ECE in %, NLL in nats.", ""]
    groups = summarize_runs(records, ["model", "regularizer", "alpha", "temperature"], METRICS)
    groups.sort(key=lambda g: (g["model"], g["alpha"], g["regularizer"], g["temperature"] or 0))
    rows = [[g["model"], g["regularizer"], g["alpha"], g["temperature"] if g["temperature"] is not None else "-",
             len(g["seeds"]), fmt_stat(g["top1"]), fmt_stat(g["nll"], 3), fmt_stat(g["ece"])] for g in groups]
    lines += [md_table(["model", "regularizer", "alpha", "T", "seeds", "top-1 %", "NLL", "ECE %"], rows), ""]
    lines += ["Paired difference LABO - LS (same seed, same alpha); positive top-1 and negative NLL/ECE favour LABO:", ""]
    drows = []
    for model in sorted({r["model"] for r in records}):
        for alpha in sorted({r["alpha"] for r in records if r["regularizer"] == "labo"}):
            for t in sorted({r["temperature"] for r in records if r["regularizer"] == "labo" and r["alpha"] == alpha}):
                cells = []
                for m in METRICS:
                    d = paired_differences(records, ["model", "alpha"], m,
                                           {"model": model, "regularizer": "labo", "alpha": alpha, "temperature": t},
                                           {"model": model, "regularizer": "label_smoothing", "alpha": alpha})
                    cells.append(fmt_stat(d, 3 if m == "nll" else 2) + f" (n={d['n']})" if d["n"] else "-")
                if any(c != "-" for c in cells):  # skip sweep points this model did not run
                    drows.append([model, alpha, t, *cells])
    lines += [md_table(["model", "alpha", "LABO T", "Δ top-1", "Δ NLL", "Δ ECE"], drows), ""]
    md = args.out_dir / f"quality_image_{args.tag}.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return md


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    t0 = time.perf_counter()
    # A tiny run decodes just what it needs unless the full cache already exists.
    cached = (args.cache_dir / "cifar10_train.pt").exists() and (args.cache_dir / "cifar10_test.pt").exists()
    small = args.preset == "tiny" and not cached
    xtr, ytr = load_cifar10("train", args.data_dir, args.cache_dir, -(-args.train_size // 10) if small else None)
    xte, yte = load_cifar10("test", args.data_dir, args.cache_dir, -(-args.test_size // 10) if small else None)
    tri, tei = balanced_subset(ytr, args.train_size), balanced_subset(yte, args.test_size)
    data = (CifarDataset(xtr[tri], ytr[tri], augment=True), CifarDataset(xte[tei], yte[tei], augment=False))
    print(f"data: train {len(tri)}, test {len(tei)} ({time.perf_counter() - t0:.1f}s)")

    out = args.out_dir / f"quality_image_{args.tag}.jsonl"
    if args.fresh and out.exists():
        out.unlink()
    done = {config_key(r) for r in read_jsonl(out)}
    for cfg in run_configs(args):
        if config_key(cfg) in done:
            print(f"skip (already in {out.name}): {cfg}")
            continue
        print(f"run {cfg}", flush=True)
        rec = train_and_eval(cfg, args, data)
        rec["machine"] = info
        append_jsonl(out, rec)  # one line per run, so a killed bench keeps what it finished
        print(f"  top1 {rec['top1']:.2f}%  nll {rec['nll']:.4f}  ece {rec['ece']:.2f}%  "
              f"({rec['train_seconds']:.0f}s)", flush=True)
        write_report(args, read_jsonl(out), info)
    md = write_report(args, read_jsonl(out), info)
    print(f"\nwrote {out} and {md}")


if __name__ == "__main__":
    main()
