"""Data for bench/efficacy_gpu.py: prepared once per invocation, before any run starts.

* Translation: one shared BPE tokenizer trained on Multi30k's training text, and every split it needs
  tokenized once (token ids saved with torch.save), so that the training processes only load ids.
* Images: CIFAR-10 decoded once into uint8 tensors (N, 3, 32, 32) saved with torch.save; each training
  process moves them to its GPU whole.

CIFAR-10 comes either from the shared JPEG zips or from the "jpgpack" form that `pack_cifar10` writes
for the GPU machine. Every JPEG in the zips carries the same 623-byte header (quantization and Huffman
tables); a jpgpack stores that header once plus each image's entropy-coded scan, which rebuilds the
original files byte for byte in a third of the zips' size (all 60,000 images, nothing subsampled).
"""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

# name -> (folder, file stem, references lowercased): as bench/quality_translation.py scores them.
TEST_SETS = {
    "multi30k_test2016": ("multi30k", "test_2016_flickr", False),
    "iwslt14_test": ("iwslt14-de-en", "test", True),
    "newstest2014": ("wmt-newstest-de-en", "newstest2014", False),
}


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    if not path.exists():
        raise ValueError(f"data file {path} does not exist (set --data_dir or LABO_DATA_DIR)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


# ------------------------------------------------------------------------------------------ translation
def train_tokenizer(texts: list[str], vocab_size: int):
    """BPE with Metaspace pre-tokenization (decoding restores the spacing BLEU is computed on) and </s>
    appended to every sequence, as Marian expects; pad=0, eos=1, unk=2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK],
                                                               show_progress=False), length=len(texts))
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def prepare_translation(data_dir: Path, work: Path, vocab: int, max_len: int, max_train: int | None,
                        test_max: int | None, ood_max: int | None) -> dict:
    """Train the shared tokenizer and tokenize every split once; returns what the runs need to know."""
    import torch

    m30k = data_dir / "multi30k"
    src, tgt = read_lines(m30k / "train.de.gz", max_train), read_lines(m30k / "train.en.gz", max_train)
    if len(src) != len(tgt):
        raise ValueError(f"{m30k}: train.de.gz has {len(src)} lines but train.en.gz {len(tgt)}")
    tok = train_tokenizer(src + tgt, vocab)
    tok.save_pretrained(work / "tokenizer")

    def ids(lines):
        return tok(lines, truncation=True, max_length=max_len)["input_ids"]

    tests = {}
    for name, (folder, stem, lowercased) in TEST_SETS.items():
        limit = test_max if name == "multi30k_test2016" else ood_max
        s, r = (read_lines(data_dir / folder / f"{stem}.{lang}.gz", limit) for lang in ("de", "en"))
        tests[name] = {"src_ids": ids(s), "refs": r, "lowercased": lowercased}
    # Teacher-forced NLL/ECE is measured on the in-domain test set's reference tokens.
    tests["multi30k_test2016"]["tgt_ids"] = ids(tests["multi30k_test2016"]["refs"])
    torch.save({"train_src": ids(src), "train_tgt": ids(tgt), "tests": tests}, work / "translation_ids.pt")
    return {"vocab_size": len(tok), "train_pairs": len(src), "pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id,
            "test_lines": {k: len(v["refs"]) for k, v in tests.items()}}


# ---------------------------------------------------------------------------------------------- images
def pack_cifar10(zip_path: Path, out_path: Path) -> dict:
    """Write the jpgpack form of one CIFAR-10 zip (see the module docstring); returns sizes."""
    header, scans, labels = None, [], []
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith(".jpg")):
            data = zf.read(name)
            sos = data.find(b"\xff\xda")
            end = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")  # end of the start-of-scan segment
            if header is None:
                header = data[:end]
            elif data[:end] != header:
                raise ValueError(f"{zip_path}:{name} has another JPEG header than the first image; "
                                 "the jpgpack form needs one shared header")
            scans.append(data[end:])
            labels.append(CLASSES.index(name.split("/")[-2]))
    offsets = np.cumsum([0] + [len(s) for s in scans], dtype=np.int64)
    np.savez(out_path, header=np.frombuffer(header, np.uint8), scans=np.frombuffer(b"".join(scans), np.uint8),
             offsets=offsets, labels=np.array(labels, np.uint8))
    return {"images": len(labels), "bytes": out_path.stat().st_size, "zip_bytes": zip_path.stat().st_size}


def _jpeg_files(cifar_dir: Path, split: str, per_class: int | None) -> tuple[list[bytes], list[int]]:
    pack = cifar_dir / f"{split}.jpgpack.npz"
    if pack.exists():
        d = np.load(pack)
        header, scans, off, labels = d["header"].tobytes(), d["scans"], d["offsets"], d["labels"].tolist()
        files = [header + scans[off[i]:off[i + 1]].tobytes() for i in range(len(labels))]
    elif (cifar_dir / f"{split}.zip").exists():
        with zipfile.ZipFile(cifar_dir / f"{split}.zip") as zf:
            names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
            if per_class is not None:
                names = [n for c in CLASSES for n in [m for m in names if m.split("/")[-2] == c][:per_class]]
            files, labels = [zf.read(n) for n in names], [CLASSES.index(n.split("/")[-2]) for n in names]
    else:
        raise ValueError(f"no CIFAR-10 {split} data in {cifar_dir}: expected {split}.jpgpack.npz or {split}.zip")
    if per_class is not None:
        keep = [i for c in range(10) for i in [j for j, lab in enumerate(labels) if lab == c][:per_class]]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    return files, labels


def _decode(files: list[bytes]) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(files), 32, 32, 3), np.uint8)
    for i, data in enumerate(files):
        with Image.open(io.BytesIO(data)) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def prepare_images(data_dir: Path, work: Path, per_class: int | None, workers: int) -> dict:
    """Decode both splits once (in parallel: 60,000 JPEGs take about a minute on one core)."""
    from concurrent.futures import ProcessPoolExecutor

    import torch

    out = {}
    for split in ("train", "test"):
        files, labels = _jpeg_files(data_dir / "cifar10", split, per_class)
        chunks = [files[i:i + 2000] for i in range(0, len(files), 2000)]
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(workers) as ex:
                arrays = list(ex.map(_decode, chunks))
        else:
            arrays = [_decode(c) for c in chunks]
        images = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()
        out[split] = {"images": images, "labels": torch.tensor(labels, dtype=torch.long)}
    torch.save(out, work / "cifar10_uint8.pt")
    return {"train_images": len(out["train"]["labels"]), "test_images": len(out["test"]["labels"])}
