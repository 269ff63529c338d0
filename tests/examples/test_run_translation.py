"""run_translation.py end to end: tiny from-scratch models on a toy corpus the tests write (CPU, offline).

The toy corpus is a word-for-word "translation" between a 16-word German vocabulary and its English
glosses: a one-layer model learns it in ~100 steps, so BLEU is well above 0 within seconds.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/datasets are imported: no test reaches the Hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from sacrebleu.metrics import BLEU, CHRF  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from conftest import DATA_DIR  # noqa: E402

import run_translation  # noqa: E402

MULTI30K = DATA_DIR / "multi30k"

WORDS = {
    "eins": "one", "zwei": "two", "drei": "three", "vier": "four", "fünf": "five", "rot": "red", "blau": "blue",
    "grün": "green", "Hund": "dog", "Katze": "cat", "Haus": "house", "Baum": "tree", "groß": "big",
    "klein": "small", "und": "and", "sieht": "sees",
}  # fmt: skip
NUM_TRAIN, NUM_EVAL = 200, 13  # 13: an odd size, so batches of 4 on 2 processes need padding duplicates

# One layer each side, no dropout (resume equality), scaled embeddings with a larger init so that the token
# embeddings are not drowned by the sinusoidal positions of a 32-dimensional model (fast learning).
MARIAN_OVERRIDES = (
    "d_model=32,encoder_layers=1,decoder_layers=1,encoder_ffn_dim=64,decoder_ffn_dim=64,"
    "encoder_attention_heads=2,decoder_attention_heads=2,dropout=0.0,attention_dropout=0.0,"
    "activation_dropout=0.0,max_position_embeddings=64,scale_embedding=True,init_std=0.1"
)
T5_OVERRIDES = "d_model=32,d_ff=64,num_layers=2,num_decoder_layers=2,num_heads=4,d_kv=8,dropout_rate=0.0"


def toy_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """n sentence pairs of 4-6 words (4-grams exist, so corpus BLEU can be > 0)."""
    rng = random.Random(seed)
    sources, targets = [], []
    for _ in range(n):
        words = [rng.choice(list(WORDS)) for _ in range(rng.randint(4, 6))]
        sources.append(" ".join(words))
        targets.append(" ".join(WORDS[w] for w in words))
    return sources, targets


def write_parallel(prefix: Path, sources: list[str], targets: list[str], gz: bool = False) -> None:
    for lang, lines in (("de", sources), ("en", targets)):
        text = "".join(line + "\n" for line in lines).encode("utf-8")
        if gz:
            Path(f"{prefix}.{lang}.gz").write_bytes(gzip.compress(text))
        else:
            Path(f"{prefix}.{lang}").write_bytes(text)


def write_jsonl(path: Path, sources: list[str], targets: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
            f.write(json.dumps({"id": i, "translation": {"de": s, "en": t}}, ensure_ascii=False) + "\n")


@pytest.fixture
def toy_text(tmp_path: Path) -> Path:
    """Parallel text files tmp/data/{train,val,test}.{de,en}; returns the data folder."""
    data = tmp_path / "data"
    data.mkdir()
    for split, n, seed in (("train", NUM_TRAIN, 0), ("val", NUM_EVAL, 1), ("test", NUM_EVAL, 2)):
        write_parallel(data / split, *toy_pairs(n, seed))
    return data


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch):
    """Call run_translation.main() with the given command-line arguments."""

    def _run(args: list) -> None:
        monkeypatch.setattr(sys, "argv", ["run_translation.py", *map(str, args)])
        run_translation.main()

    return _run


def marian_args(data: Path, output_dir: Path, steps: int = 100) -> list:
    return [
        "--model_type", "marian", "--config_overrides", MARIAN_OVERRIDES, "--train_tokenizer_vocab_size", 100,
        "--train_prefix", data / "train", "--source_lang", "de", "--target_lang", "en",
        "--max_source_length", 32, "--max_target_length", 32,
        "--do_train", "--per_device_train_batch_size", 16, "--per_device_eval_batch_size", 4,
        "--learning_rate", 1e-2, "--lr_scheduler_type", "constant", "--max_steps", steps,
        "--output_dir", output_dir, "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
        "--seed", 0, "--logging_steps", 50,
    ]  # fmt: skip


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def first_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def assert_finite_metrics(results: dict, keys: list[str]) -> None:
    for key in keys:
        assert key in results, f"{key} missing from all_results.json: {sorted(results)}"
        assert math.isfinite(results[key]), f"{key}={results[key]}"


def assert_reloads_like_checkpoint(output_dir: Path, checkpoint: Path, text: str) -> None:
    """The final folder reloads with the plain Auto classes and gives the very logits of the last checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"]
    batch = tokenizer([text], text_target=[text], return_tensors="pt")
    logits = []
    for folder in (output_dir, checkpoint):
        model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits.append(model(**batch).logits)
    assert logits[0].shape[-1] >= len(tokenizer)
    assert torch.equal(logits[0], logits[1])


def test_marian_from_scratch_on_parallel_text(toy_text: Path, tmp_path: Path, run_main) -> None:
    out = tmp_path / "out"
    run_main(
        marian_args(toy_text, out)
        + ["--validation_prefix", toy_text / "val", "--test_prefix", toy_text / "test", "--do_eval", "--do_predict",
           "--predict_with_generate", "--save_steps", 100]  # fmt: skip
    )
    results = read_json(out / "all_results.json")
    assert_finite_metrics(
        results,
        ["train_loss", "eval_loss", "eval_nll", "eval_bleu", "eval_chrf", "predict_nll", "predict_bleu",
         "predict_chrf"],  # fmt: skip
    )
    assert results["train_samples"] == NUM_TRAIN
    assert results["eval_samples"] == results["predict_samples"] == NUM_EVAL
    # Learned: an untrained model scores 0 BLEU on this corpus; 100 steps reach ~40-50.
    assert results["eval_bleu"] > 20 and results["predict_bleu"] > 20
    assert results["eval_nll"] < 1.5

    # The predictions file has one line per test example, and its corpus BLEU against the raw references is
    # exactly the reported predict_bleu: each example was scored once, against its own reference.
    predictions = first_lines(out / "generated_predictions.txt")
    references = first_lines(toy_text / "test.en")
    assert len(predictions) == NUM_EVAL
    assert round(BLEU().corpus_score(predictions, [references]).score, 4) == results["predict_bleu"]

    # The saved model and tokenizer reproduce those predictions with the plain Auto classes (same batches
    # of 4 and the same generation length as the script).
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    sources = first_lines(toy_text / "test.de")
    regenerated = []
    for start in range(0, NUM_EVAL, 4):
        batch = tokenizer(sources[start : start + 4], padding=True, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**batch, max_length=32, num_beams=1)
        regenerated += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert regenerated == predictions
    assert_reloads_like_checkpoint(out, out / "checkpoint-100", sources[0])

    # The saved folder is a pretrained model for the script: evaluating it again gives the same scores.
    reevaluated = tmp_path / "reevaluated"
    run_main(
        ["--model_name_or_path", out, "--validation_prefix", toy_text / "val", "--source_lang", "de",
         "--target_lang", "en", "--max_source_length", 32, "--max_target_length", 32, "--do_eval",
         "--predict_with_generate", "--per_device_eval_batch_size", 4, "--output_dir", reevaluated, "--use_cpu",
         "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
    )
    again = read_json(reevaluated / "all_results.json")
    assert (again["eval_bleu"], again["eval_chrf"]) == (results["eval_bleu"], results["eval_chrf"])
    assert again["eval_nll"] == pytest.approx(results["eval_nll"], rel=1e-5)

    card = (out / "README.md").read_text(encoding="utf-8")
    assert "trained from scratch on the local de-en data (train, val, test)" in card
    assert "LABO" in card
    assert "- labo" in card  # metadata tag
    assert "- label_regularizer: labo" in card
    assert "- label_regularizer_alpha: 0.1" in card
    assert "- labo_temperature: 2.0" in card


def test_t5_from_scratch_on_json_lines_from_args_file(tmp_path: Path, run_main) -> None:
    """T5 with a source prefix, json lines input, the label-smoothing baseline, beam search, and all
    arguments in one .json file."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", *toy_pairs(NUM_TRAIN, 0))
    write_jsonl(data / "val.jsonl", *toy_pairs(NUM_EVAL, 1))
    out = tmp_path / "out"
    args = {
        "model_type": "t5", "config_overrides": T5_OVERRIDES, "train_tokenizer_vocab_size": 100,
        "source_prefix": "translate German to English: ",
        "train_file": str(data / "train.jsonl"), "validation_file": str(data / "val.jsonl"),
        "source_lang": "de", "target_lang": "en", "max_source_length": 32, "max_target_length": 32,
        "label_regularizer": "label_smoothing", "label_regularizer_alpha": 0.1,
        "do_train": True, "do_eval": True, "predict_with_generate": True, "generation_num_beams": 2,
        "per_device_train_batch_size": 16, "per_device_eval_batch_size": 4, "learning_rate": 1e-2,
        "lr_scheduler_type": "constant", "max_steps": 150, "save_steps": 150, "output_dir": str(out),
        "use_cpu": True, "report_to": "none", "disable_tqdm": True, "seed": 0, "cache_dir": str(tmp_path / "cache"),
    }  # fmt: skip
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps(args), encoding="utf-8")
    run_main([args_file])

    results = read_json(out / "all_results.json")
    assert_finite_metrics(results, ["train_loss", "eval_loss", "eval_nll", "eval_bleu", "eval_chrf"])
    assert results["eval_samples"] == NUM_EVAL
    # T5 has no absolute positions, so word-order alignment is slower to learn than Marian's: after 150 steps
    # BLEU is ~2-4 and the NLL ~1.5 (an untrained model: 0 BLEU, NLL ~4.6).
    assert results["eval_bleu"] > 1
    assert results["eval_nll"] < 2.0
    assert not (out / "generated_predictions.txt").exists()  # no --do_predict
    assert AutoModelForSeq2SeqLM.from_pretrained(out).config.model_type == "t5"
    assert_reloads_like_checkpoint(out, out / "checkpoint-150", "translate German to English: rot Hund")

    card = (out / "README.md").read_text(encoding="utf-8")
    assert "LABO" in card and "- label_regularizer: label_smoothing" in card
    assert "labo_temperature" not in card  # not a hyperparameter of label smoothing


def test_resume_from_checkpoint_matches_uninterrupted_training(toy_text: Path, tmp_path: Path, run_main) -> None:
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    # bpe: the tokenizers library's unigram trainer is not reproducible, so the straight run would get another
    # vocabulary; the resumed run must take the tokenizer from the checkpoint, not retrain it.
    bpe = ["--train_tokenizer_model", "bpe"]
    run_main(marian_args(toy_text, interrupted, steps=4) + ["--save_steps", 4, *bpe])
    assert (interrupted / "checkpoint-4").is_dir()
    run_main(
        marian_args(toy_text, interrupted, steps=8)
        + ["--save_steps", 4, "--resume_from_checkpoint", interrupted / "checkpoint-4", *bpe]
    )
    run_main(marian_args(toy_text, straight, steps=8) + ["--save_steps", 4, *bpe])
    tokenizer_model = json.loads((interrupted / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"]
    assert tokenizer_model == "BPE"
    assert (interrupted / "tokenizer.json").read_bytes() == (interrupted / "checkpoint-4" / "tokenizer.json").read_bytes()

    assert read_json(interrupted / "trainer_state.json")["global_step"] == 8
    resumed, reference = load_file(interrupted / "model.safetensors"), load_file(straight / "model.safetensors")
    assert resumed.keys() == reference.keys()
    first_step = load_file(interrupted / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(first_step[k], reference[k]) for k in reference)  # steps 5-8 changed weights
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="needs Multi30k in $LABO_DATA_DIR or ../shared/data")
def test_two_processes_torchrun_scores_each_example_once(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo) on real Multi30k .gz files: 13 test examples in batches of 4 per
    process leave 3 padding duplicates in the gathered predictions, which must not be scored or written."""
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        torchrun, "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", free_port(),
        REPO_ROOT / "run_translation.py",
        "--model_type", "marian", "--config_overrides", MARIAN_OVERRIDES, "--train_tokenizer_vocab_size", 300,
        "--train_prefix", MULTI30K / "val", "--max_train_samples", 64,
        "--test_prefix", MULTI30K / "test_2016_flickr", "--max_predict_samples", NUM_EVAL,
        "--source_lang", "de", "--target_lang", "en", "--max_source_length", 48, "--max_target_length", 48,
        "--do_train", "--do_predict", "--predict_with_generate", "--generation_max_length", 8,
        "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 4, "--num_train_epochs", 1,
        "--output_dir", out, "--use_cpu", "--ddp_backend", "gloo", "--report_to", "none", "--disable_tqdm", "true",
        "--save_strategy", "no", "--seed", 0, "--log_level_replica", "info",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    completed = subprocess.run(
        [str(part) for part in command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log[-5000:]
    assert "Process rank: 0, world size: 2" in log and "Process rank: 1, world size: 2" in log
    # 64 examples, 8 per process and step: 4 steps with 2 processes (8 with one).
    assert read_json(out / "trainer_state.json")["global_step"] == 4

    results = read_json(out / "all_results.json")
    assert results["predict_samples"] == NUM_EVAL
    assert_finite_metrics(results, ["predict_bleu", "predict_chrf", "predict_nll"])
    predictions = first_lines(out / "generated_predictions.txt")
    assert len(predictions) == NUM_EVAL
    with gzip.open(MULTI30K / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
        references = [line.rstrip("\n") for _, line in zip(range(NUM_EVAL), f, strict=False)]
    # Scored once per example against its own reference: the file's corpus scores are the reported ones.
    assert round(BLEU().corpus_score(predictions, [references]).score, 4) == results["predict_bleu"]
    assert round(CHRF().corpus_score(predictions, [references]).score, 4) == results["predict_chrf"]
    assert results["predict_chrf"] > 0


# ---- argument and data errors: a ValueError naming the flag or the file, before any training ----


def test_label_smoothing_factor_conflicts_with_label_regularizer(toy_text: Path, tmp_path: Path, run_main) -> None:
    with pytest.raises(ValueError, match="--label_smoothing_factor"):
        run_main(marian_args(toy_text, tmp_path / "out") + ["--label_smoothing_factor", 0.1])


def test_temperature_with_label_smoothing_is_rejected(toy_text: Path, tmp_path: Path, run_main) -> None:
    with pytest.raises(ValueError, match="--labo_temperature"):
        run_main(
            marian_args(toy_text, tmp_path / "out")
            + ["--label_regularizer", "label_smoothing", "--labo_temperature", 2.0]
        )


def test_missing_parallel_file(toy_text: Path, tmp_path: Path, run_main) -> None:
    (toy_text / "train.en").unlink()
    with pytest.raises(ValueError, match=r"--train_prefix.*train\.en.*train\.en\.gz"):
        run_main(marian_args(toy_text, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labo_fused_linear"], "--labo_fused_linear applies to decoder-only causal LMs"),
        (["--label_names", "target_ids"], "--label_names target_ids"),
        (["--config_overrides", "d_modle=64"], "--config_overrides='d_modle=64'"),
        (["--max_source_length", "512"], "--max_source_length=512 exceeds the model's 256 position embeddings"),
        (["--do_eval"], "The validation split is needed .* --validation_file or --validation_prefix"),
        (["--do_predict", "--predict_with_generate", "--test_prefix", "DATA/nope"], "--test_prefix=.*nope"),
        (["--do_eval", "--validation_prefix", "DATA/val", "--metric_for_best_model", "bleu"],
         "--metric_for_best_model bleu .* add --predict_with_generate"),
    ],
)
def test_refusals_come_before_any_work(toy_text: Path, tmp_path: Path, run_main, extra: list, message: str) -> None:
    """Issue 17: --labo_fused_linear was refused only after the tokenizer was trained, leaving files in
    --output_dir. Every refusal now comes before data, tokenizer or model work: the folder is not created."""
    out = tmp_path / "out"
    base = ["--model_type", "marian", "--train_prefix", toy_text / "train", "--source_lang", "de",
            "--target_lang", "en", "--do_train", "--output_dir", out, "--use_cpu"]  # fmt: skip
    extra = [str(a).replace("DATA", str(toy_text)) for a in extra]
    with pytest.raises(ValueError, match=message):
        run_main(base + extra)
    assert not out.exists()


def test_unreachable_pretrained_model_is_refused_before_any_work(toy_text: Path, tmp_path: Path, run_main) -> None:
    out = tmp_path / "out"
    args = ["--model_name_or_path", tmp_path / "no-such-model", "--train_prefix", toy_text / "train",
            "--source_lang", "de", "--target_lang", "en", "--do_train", "--output_dir", out, "--use_cpu"]  # fmt: skip
    with pytest.raises(ValueError, match="--model_name_or_path=.*no-such-model.*no such local file or folder"):
        run_main(args)
    assert not out.exists()


# ---- the from-scratch recipe defaults ----


def test_from_scratch_defaults_are_applied_only_to_unset_flags(toy_text: Path, tmp_path: Path) -> None:
    from labo_hf.examples.seq2seq_from_scratch import SCRATCH_CONFIG_OVERRIDES

    base = ["--model_type", "marian", "--train_prefix", str(toy_text / "train"), "--source_lang", "de",
            "--target_lang", "en", "--do_train", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    model_args, data_args, args, applied = run_translation.parse_arguments(base)
    assert args.learning_rate == 1e-3 and args.per_device_train_batch_size == 64 and args.num_train_epochs == 3
    assert args.logging_steps == 25 and args.warmup_steps == 0.1 and args.train_sampling_strategy == "group_by_length"
    assert model_args.config_overrides == SCRATCH_CONFIG_OVERRIDES["marian"]
    assert model_args.train_tokenizer_vocab_size == 3000 and data_args.max_source_length == 128
    assert applied["learning_rate"] == "1e-3" and "config_overrides" in applied
    model_args, _, _, _ = run_translation.parse_arguments(["--model_type", "t5"] + base[2:])
    assert model_args.config_overrides == SCRATCH_CONFIG_OVERRIDES["t5"]  # and valid T5 keys (checked at parse)

    # An explicit flag wins, even when it equals transformers' default, and is not reported as a script default.
    model_args, _, args, applied = run_translation.parse_arguments(
        base + ["--learning_rate", "5e-5", "--config_overrides", "d_model=64", "--logging_steps", "500"]
    )
    assert args.learning_rate == 5e-5 and args.logging_steps == 500 and model_args.config_overrides == "d_model=64"
    assert not {"learning_rate", "config_overrides", "logging_steps"} & set(applied)
    assert args.per_device_train_batch_size == 64  # the other defaults still apply

    # A pretrained model keeps transformers' defaults (fine-tuning); with --tokenizer_name no vocabulary default.
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    _, _, args, applied = run_translation.parse_arguments(
        ["--model_name_or_path", str(pretrained)] + base[2:]
    )
    assert applied == {} and args.learning_rate == 5e-5 and args.per_device_train_batch_size == 8
    model_args, _, _, applied = run_translation.parse_arguments(base + ["--tokenizer_name", str(pretrained)])
    assert "train_tokenizer_vocab_size" not in applied and model_args.train_tokenizer_vocab_size is None


def test_from_scratch_defaults_are_logged_and_loss_is_logged_early(
    toy_text: Path, tmp_path: Path, run_main, caplog: pytest.LogCaptureFixture
) -> None:
    """The plain from-scratch command logs the defaults it applied and a training loss within its first
    25 steps (transformers' default: the first at step 500)."""
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        run_main(["--model_type", "marian", "--train_prefix", toy_text / "train", "--source_lang", "de",
                  "--target_lang", "en", "--do_train", "--output_dir", out, "--use_cpu", "--max_steps", 25,
                  "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"])  # fmt: skip
    assert "Script defaults applied" in caplog.text and "'learning_rate': '1e-3'" in caplog.text
    losses = [entry for entry in read_json(out / "trainer_state.json")["log_history"] if "loss" in entry]
    assert losses and losses[0]["step"] <= 25 and math.isfinite(losses[0]["loss"])


def test_missing_data_file(tmp_path: Path, run_main) -> None:
    args = ["--model_type", "marian", "--train_file", tmp_path / "nope.jsonl", "--source_lang", "de",
            "--target_lang", "en", "--do_train", "--output_dir", tmp_path / "out", "--use_cpu"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--train_file=.*nope\.jsonl.*no such file"):
        run_main(args)


def test_truncated_gzip_parallel_file_is_named(tmp_path: Path) -> None:
    write_parallel(tmp_path / "p", ["ein Satz"] * 200, ["a sentence"] * 200, gz=True)
    data = (tmp_path / "p.de.gz").read_bytes()
    (tmp_path / "p.de.gz").write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(ValueError, match=r"p\.de\.gz: corrupt or truncated gzip file"):
        run_translation.read_parallel_text(str(tmp_path / "p"), "de", "en", "--train_prefix")
    (tmp_path / "p.de.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"p\.de\.gz: corrupt or truncated gzip file"):
        run_translation.read_parallel_text(str(tmp_path / "p"), "de", "en", "--train_prefix")
    # json lines and csv through --train_file: the flag and the file, not an error from the datasets builder.
    rows = "".join(json.dumps({"translation": {"de": f"Satz {i}", "en": f"sentence {i}"}}) + "\n" for i in range(2000))
    for name, text in (("t.jsonl.gz", rows), ("t.csv.gz", "de,en\n" + "Satz,sentence\n" * 2000)):
        data = gzip.compress(text.encode("utf-8"))
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=rf"--train_file=.*{name.replace('.', '[.]')}': corrupt or truncated gzip"):
            run_translation.load_local_file(str(tmp_path / name), "--train_file", str(tmp_path / "c"))


def test_misaligned_parallel_files_name_both_files(toy_text: Path, tmp_path: Path, run_main) -> None:
    lines = first_lines(toy_text / "train.en")
    (toy_text / "train.en").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    expected = rf"train\.de has {NUM_TRAIN} lines but .*train\.en has {NUM_TRAIN - 1} lines"
    with pytest.raises(ValueError, match=expected):
        run_main(marian_args(toy_text, tmp_path / "out"))


def test_multi_process_launch_without_use_cpu_is_refused(
    toy_text: Path, tmp_path: Path, run_main, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What torchrun sets; on a machine without GPUs and without --use_cpu each process would run on its own.
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = [a for a in marian_args(toy_text, tmp_path / "out") if a != "--use_cpu"]
    with pytest.raises(ValueError, match="add --use_cpu"):
        run_main(args)


def test_unknown_source_language_in_json_lines(tmp_path: Path, run_main) -> None:
    write_jsonl(tmp_path / "train.jsonl", *toy_pairs(20, 0))
    args = ["--model_type", "marian", "--train_file", tmp_path / "train.jsonl", "--source_lang", "xx",
            "--target_lang", "en", "--do_train", "--output_dir", tmp_path / "out", "--use_cpu",
            "--cache_dir", tmp_path / "cache"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--source_lang 'xx' is not in --train_file .*\['de', 'en'\]"):
        run_main(args)


def test_unreachable_hub_model_names_local_alternative(toy_text: Path, tmp_path: Path, run_main) -> None:
    args = ["--model_name_or_path", "Helsinki-NLP/opus-mt-de-en", "--train_prefix", toy_text / "train",
            "--source_lang", "de", "--target_lang", "en", "--do_train", "--output_dir", tmp_path / "out",
            "--use_cpu"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--model_name_or_path='Helsinki-NLP/opus-mt-de-en'.*--model_type"):
        run_main(args)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model_name_or_path", "some/model"], "--model_type .* cannot be combined with --model_name_or_path"),
        (["--tokenizer_name", "some/tokenizer"], "--train_tokenizer_vocab_size only applies"),
        (["--validation_prefix", "val"], "--validation_prefix is given but unused"),
        (["--do_predict", "--test_prefix", "test"], "--do_predict .* add --predict_with_generate"),
    ],
)
def test_inconsistent_flags(toy_text: Path, tmp_path: Path, run_main, extra: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_main(marian_args(toy_text, tmp_path / "out") + extra)


# ---- data readers ----


def test_readers_for_csv_tsv_and_gzip_parallel_text(tmp_path: Path) -> None:
    # csv: quoted commas, a number-only sentence and "NA" stay text; extra columns are dropped.
    (tmp_path / "data.csv").write_text('id,de,en\n1,"eins, zwei",NA\n2,007,"say ""hi"""\n', encoding="utf-8")
    dataset = run_translation.load_local_file(str(tmp_path / "data.csv"), "--train_file", str(tmp_path / "c"))
    dataset = run_translation.to_translation_format(dataset, "de", "en", "data.csv")
    assert dataset["translation"] == [{"de": "eins, zwei", "en": "NA"}, {"de": "007", "en": 'say "hi"'}]
    # tsv: quotes are plain characters.
    (tmp_path / "data.tsv").write_text('en\tde\n"Hi" there\t"Hallo" da\n', encoding="utf-8")
    dataset = run_translation.load_local_file(str(tmp_path / "data.tsv"), "--train_file", str(tmp_path / "c"))
    dataset = run_translation.to_translation_format(dataset, "de", "en", "data.tsv")
    assert dataset["translation"] == [{"de": '"Hallo" da', "en": '"Hi" there'}]
    # gzip parallel text with CRLF line ends and an in-sentence U+2028 that must not split the line.
    write_parallel(tmp_path / "p", ["a\u2028b\r", "c\r"], ["x\r", "y\r"], gz=True)
    dataset = run_translation.read_parallel_text(str(tmp_path / "p"), "de", "en", "--train_prefix")
    assert dataset["translation"] == [{"de": "a\u2028b", "en": "x"}, {"de": "c", "en": "y"}]
    # Both a plain and a .gz file for one language is ambiguous.
    write_parallel(tmp_path / "p", ["a"], ["x"])
    with pytest.raises(ValueError, match=r"both .*p\.de and .*p\.de\.gz exist"):
        run_translation.read_parallel_text(str(tmp_path / "p"), "de", "en", "--train_prefix")


def test_help_lists_labo_flags(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["run_translation.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        run_translation.main()
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ("--label_regularizer {labo,label_smoothing,cross_entropy}", "--label_regularizer_alpha",
                 "--labo_temperature", "--train_prefix", "--model_type {marian,t5}", "--train_tokenizer_vocab_size"):  # fmt: skip
        assert flag in text
    assert "optimal label smoothing" in text  # help text of --label_regularizer
    assert "torchrun --nproc_per_node 2 run_translation.py" in text  # the usage docstring


# ---- labo_hf.examples.launch (shared with the other example scripts) ----


def test_resolve_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from labo_hf.examples.launch import resolve_checkpoint

    for name in ("checkpoint-4", "checkpoint-12"):  # complete as far as resuming needs: state and weights
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
        save_file({"w": torch.zeros(1)}, tmp_path / name / "model.safetensors")  # loadable (an empty file is not)
    (tmp_path / "checkpoint-16").mkdir()  # a save that never finished: skipped
    args = SimpleNamespace(resume_from_checkpoint=None, do_train=True, output_dir=str(tmp_path))
    assert resolve_checkpoint(args) == str(tmp_path / "checkpoint-12")  # the last one, by step
    assert resolve_checkpoint(SimpleNamespace(**{**vars(args), "do_train": False})) is None
    explicit = SimpleNamespace(**{**vars(args), "resume_from_checkpoint": str(tmp_path / "checkpoint-4")})
    assert resolve_checkpoint(explicit) == str(tmp_path / "checkpoint-4")
    missing = SimpleNamespace(**{**vars(args), "resume_from_checkpoint": str(tmp_path / "checkpoint-8")})
    with pytest.raises(ValueError, match="--resume_from_checkpoint=.*checkpoint-8.* is not a folder"):
        resolve_checkpoint(missing)
    incomplete = SimpleNamespace(**{**vars(args), "resume_from_checkpoint": str(tmp_path / "checkpoint-16")})
    with pytest.raises(ValueError, match="--resume_from_checkpoint=.*checkpoint-16.* not a complete checkpoint"):
        resolve_checkpoint(incomplete)


def test_check_hub_reachable_or_local(tmp_path: Path) -> None:
    from labo_hf.examples.launch import check_hub_reachable_or_local

    check_hub_reachable_or_local(str(tmp_path), "--model_name_or_path", "hint")  # an existing folder
    with pytest.raises(ValueError, match=r"--model_name_or_path='\./no/such/folder': no such local .* Use X\."):
        check_hub_reachable_or_local("./no/such/folder", "--model_name_or_path", "Use X.")
    with pytest.raises(ValueError, match=r"--dataset_name='someone/unknown-data' .*offline.* Use Y\."):
        check_hub_reachable_or_local("someone/unknown-data", "--dataset_name", "Use Y.", repo_type="dataset")


def test_dataset_name_as_local_folder_and_unreachable_hub_dataset(tmp_path: Path, run_main) -> None:
    """--dataset_name takes a Hub id or a local data set folder (split names inferred from the file names);
    an unknown Hub id fails fast offline, naming the local-file flags."""
    folder = tmp_path / "toy_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", *toy_pairs(40, 0))
    write_jsonl(folder / "validation.jsonl", *toy_pairs(NUM_EVAL, 1))
    out = tmp_path / "out"
    common = ["--model_type", "marian", "--config_overrides", MARIAN_OVERRIDES, "--train_tokenizer_vocab_size", 100,
              "--source_lang", "de", "--target_lang", "en", "--max_source_length", 32, "--max_target_length", 32,
              "--do_train", "--do_eval", "--max_steps", 2,
              "--output_dir", out, "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
              "--cache_dir", tmp_path / "cache"]  # fmt: skip
    run_main(["--dataset_name", folder, *common])
    results = read_json(out / "all_results.json")
    assert (results["train_samples"], results["eval_samples"]) == (40, NUM_EVAL)
    assert_finite_metrics(results, ["eval_loss", "eval_nll"])
    assert "eval_bleu" not in results  # no --predict_with_generate: nothing generated to score

    with pytest.raises(ValueError, match=r"--dataset_name='someone/unknown-data'.*--train_prefix"):
        # Another --output_dir: `out` now holds a run on other data, which would be refused first.
        run_main(["--dataset_name", "someone/unknown-data", *common, "--output_dir", tmp_path / "out2"])


def test_blank_line_training_data_is_a_clear_error(tmp_path: Path, run_main) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_parallel(data / "train", ["", "   ", ""], ["", "", "\t"])
    with pytest.raises(ValueError, match=r"The train data .*train: none of its 3 pairs has text on both sides"):
        run_main(marian_args(data, tmp_path / "out", steps=2))
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # stopped before the tokenizer was trained


def test_blank_pairs_are_dropped_with_a_warning(tmp_path: Path, run_main, caplog) -> None:
    data = tmp_path / "data"
    data.mkdir()
    sources, targets = toy_pairs(40, 0)
    sources[3], targets[7] = "  ", ""
    write_parallel(data / "train", sources, targets)
    with caplog.at_level("WARNING"):
        run_main(marian_args(data, tmp_path / "out", steps=1))
    assert read_json(tmp_path / "out" / "all_results.json")["train_samples"] == 38
    assert "2 of 40 pairs have an empty or whitespace-only de or en side; dropped" in caplog.text


def test_from_scratch_defaults_are_documented() -> None:
    from labo_hf.examples.seq2seq_from_scratch import SCRATCH_TOKENIZER_VOCAB_SIZE, SCRATCH_TRAINING_DEFAULTS

    doc = " ".join(run_translation.__doc__.split())  # --help shows the docstring
    for key, value in {**SCRATCH_TRAINING_DEFAULTS, "train_tokenizer_vocab_size": SCRATCH_TOKENIZER_VOCAB_SIZE}.items():
        assert f"--{key} {value}" in doc, key
