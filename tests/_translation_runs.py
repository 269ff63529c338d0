"""Tiny run_translation.py runs for the tests of issue 16 (tests/examples/test_output_safety.py and
test_checkpoint_safety.py): a toy parallel corpus, the command line of a 1-layer Marian from scratch, and folder
snapshots."""

from __future__ import annotations

import random
from pathlib import Path

from labo_hf.hf.run_record import write_run_record

WORDS = {"eins": "one", "zwei": "two", "rot": "red", "blau": "blue", "Hund": "dog", "Katze": "cat", "Haus": "house",
         "Baum": "tree"}
OVERRIDES = ("d_model=16,encoder_layers=1,decoder_layers=1,encoder_ffn_dim=32,decoder_ffn_dim=32,"
             "encoder_attention_heads=2,decoder_attention_heads=2,dropout=0.0,max_position_embeddings=32")


def write_parallel(prefix: Path, n: int = 32, seed: int = 0, bom: bool = False) -> None:
    rng = random.Random(seed)
    pairs = [[rng.choice(list(WORDS)) for _ in range(rng.randint(3, 5))] for _ in range(n)]
    for lang, lines in (("de", [" ".join(p) for p in pairs]), ("en", [" ".join(WORDS[w] for w in p) for p in pairs])):
        Path(f"{prefix}.{lang}").write_text(("\ufeff" if bom else "") + "".join(line + "\n" for line in lines),
                                            encoding="utf-8")


def args_for(prefix: Path, out: Path, steps: int = 4, **flags: object) -> list[str]:
    args = ["--model_type", "marian", "--config_overrides", OVERRIDES, "--train_tokenizer_vocab_size", 60,
            "--max_source_length", 16, "--max_target_length", 16, "--train_prefix", prefix, "--source_lang", "de",
            "--target_lang", "en", "--do_train",
            "--per_device_train_batch_size", 8, "--max_steps", steps, "--save_steps", 2, "--output_dir", out,
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", 0, "--logging_steps", 1]
    for flag, value in flags.items():
        args += [f"--{flag}"] if value is True else [f"--{flag}", value]
    return [str(arg) for arg in args]


def previous_run(out: Path, entries: list[str]) -> None:
    """A folder as an earlier labo-hf run left it: a run record listing `entries`, which exist."""
    out.mkdir(parents=True, exist_ok=True)
    for name in entries:
        (out / name).mkdir(exist_ok=True)
        (out / name / "weights.bin").write_bytes(b"w")
    write_run_record(str(out), {"label_regularizer": "labo"}, {"entries": entries})


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

