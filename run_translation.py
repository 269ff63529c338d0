#!/usr/bin/env python
"""Train, evaluate and run translation models with LABO label regularization (optimal label smoothing).

The transformers `run_translation.py` recipe with the loss swapped: `LABOSeq2SeqTrainer` trains with
``--label_regularizer labo`` (default), ``label_smoothing`` or ``cross_entropy``, so the baselines run through
this same script. BLEU and chrF are computed with sacrebleu on detokenized text, each example counted once.

Usage (copy-paste; replace the data paths):

    # From scratch: a small Marian model and a BPE tokenizer trained on the training data (Multi30k de->en,
    # parallel text files train.de.gz / train.en.gz, ...).
    python run_translation.py \\
        --model_type marian \\
        --config_overrides "d_model=256,encoder_layers=3,decoder_layers=3,encoder_ffn_dim=1024,decoder_ffn_dim=1024,encoder_attention_heads=4,decoder_attention_heads=4,scale_embedding=True" \\
        --train_tokenizer_vocab_size 8000 \\
        --train_prefix /path/to/multi30k/train --validation_prefix /path/to/multi30k/val \\
        --test_prefix /path/to/multi30k/test_2016_flickr \\
        --source_lang de --target_lang en \\
        --label_regularizer labo --label_regularizer_alpha 0.1 --labo_temperature 2.0 \\
        --do_train --do_eval --do_predict --predict_with_generate --generation_num_beams 4 \\
        --per_device_train_batch_size 64 --learning_rate 5e-4 --warmup_steps 1000 --num_train_epochs 20 \\
        --output_dir runs/marian-multi30k-labo

    # The label-smoothing baseline: same command with
    #     --label_regularizer label_smoothing --label_regularizer_alpha 0.1   (and no --labo_temperature)

    # Fine-tune a pretrained MarianMT model (Hub id or local folder) on json lines
    # ({"translation": {"de": "...", "en": "..."}} per line; csv/tsv with one column per language also work).
    python run_translation.py \\
        --model_name_or_path Helsinki-NLP/opus-mt-de-en \\
        --train_file train.jsonl --validation_file val.jsonl --source_lang de --target_lang en \\
        --do_train --do_eval --predict_with_generate --output_dir runs/opus-mt-de-en-labo

    # T5 needs a task prefix; a from-scratch T5 is --model_type t5 with T5 keys in --config_overrides
    # (e.g. "d_model=256,d_ff=1024,num_layers=3,num_decoder_layers=3,num_heads=4,d_kv=64").
    python run_translation.py \\
        --model_name_or_path google-t5/t5-small --source_prefix "translate English to German: " \\
        --dataset_name wmt/wmt16 --dataset_config_name de-en --source_lang en --target_lang de \\
        --do_train --do_eval --predict_with_generate --output_dir runs/t5-small-wmt16-labo

    # Several processes: the same arguments under torchrun or accelerate launch.
    torchrun --nproc_per_node 2 run_translation.py ARGS...
    accelerate launch --num_processes 2 run_translation.py ARGS...
    # On CPU add --use_cpu --ddp_backend gloo (and for accelerate, --multi_gpu: its multi-process launcher).

    # All arguments from one file (same keys as the flags).
    python run_translation.py args.json        # or args.yaml

Outputs in --output_dir: the model with its tokenizer (reloadable with AutoModelForSeq2SeqLM /
AutoTokenizer), checkpoints (resumed automatically, or pick one with --resume_from_checkpoint),
{train,eval,predict,all}_results.json (eval_bleu, eval_chrf, eval_nll, predict_bleu, ...),
generated_predictions.txt with --do_predict, and a model card (README.md) naming the regularizer.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import transformers
from datasets import Dataset, DatasetDict, Features, Value, load_dataset
from sacrebleu.metrics import BLEU, CHRF
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    default_data_collator,
    set_seed,
)

from labo_hf import LABOSeq2SeqTrainer, LABOSeq2SeqTrainingArguments
from labo_hf.script_utils import (
    check_hub_reachable_or_local,
    check_launch_matches_world_size,
    configure_logging,
    hub_load_errors,
    labo_model_card_kwargs,
    resolve_checkpoint,
    shutdown_distributed,
)

logger = logging.getLogger(__name__)

# Model types that can be built from scratch: their special-token layout (pad, eos, unk; decoder start = pad)
# is what `train_tokenizer` produces.
SCRATCH_MODEL_TYPES = ("marian", "t5")
TOKENIZER_MODELS = ("bpe", "unigram")
DEFAULT_TOKENIZER_VOCAB_SIZE = 8000
DEFAULT_TOKENIZER_MODEL = "bpe"
# Special tokens of a trained tokenizer, in id order: pad=0, eos=1, unk=2, as in T5 (Marian accepts any ids).
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
LOCAL_MODEL_HINT = (
    "Offline, pass a local model folder to --model_name_or_path, or train from scratch with --model_type "
    "marian|t5 (plus --config_overrides); a tokenizer is then trained on the training data."
)
LOCAL_DATA_HINT = (
    "Offline, use local data instead: --train_prefix/--validation_prefix/--test_prefix for parallel text "
    "files (PREFIX.SRC and PREFIX.TGT, optionally .gz) or --train_file/--validation_file/--test_file for json "
    "lines or csv/tsv."
)
SPLITS = ("train", "validation", "test")
SPLIT_FLAGS = {"train": "--do_train", "validation": "--do_eval or --eval_strategy", "test": "--do_predict"}
SAMPLE_LIMIT_FLAGS = {"train": "max_train_samples", "validation": "max_eval_samples", "test": "max_predict_samples"}
LOCAL_FILE_FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "tsv": "csv"}


@dataclass
class ModelArguments:
    """Which model and tokenizer to train: pretrained (--model_name_or_path) or from scratch (--model_type)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained AutoModelForSeq2SeqLM: a Hub id (e.g. Helsinki-NLP/opus-mt-de-en) or a local "
            "folder. Leave unset and pass --model_type to train from scratch."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Train a model of this type from scratch, with its default configuration modified by "
            "--config_overrides.",
            "choices": list(SCRATCH_MODEL_TYPES),
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "From scratch only: comma-separated config changes, e.g. "
            "'d_model=64,encoder_layers=2,decoder_layers=2' (Marian) or 'd_model=64,num_layers=2' (T5)."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Pretrained config name or path, if not the one of --model_name_or_path."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained tokenizer name or path, if not the one of --model_name_or_path. From scratch "
            "without it, a tokenizer is trained on the training data."
        },
    )
    train_tokenizer_vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary size of the tokenizer trained on the source and target training text (from "
            f"scratch without --tokenizer_name only). Defaults to {DEFAULT_TOKENIZER_VOCAB_SIZE} there."
        },
    )
    train_tokenizer_model: str | None = field(
        default=None,
        metadata={
            "help": "Subword model of the trained tokenizer (from scratch without --tokenizer_name only). "
            f"Defaults to {DEFAULT_TOKENIZER_MODEL} there. bpe training is reproducible; the tokenizers "
            "library's unigram trainer gives a slightly different vocabulary on every run.",
            "choices": list(TOKENIZER_MODELS),
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where to store the models and data sets downloaded from the Hub."},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The model version to use (branch name, tag name or commit id)."},
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for private models and data sets (default: the one of `hf auth login`)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models defined on the Hub by their own modeling code (executes that code)."},
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path is not None:
            if self.model_type is not None:
                raise ValueError(
                    "--model_type trains a new model from scratch and cannot be combined with "
                    "--model_name_or_path; pass only one of them."
                )
            if self.config_overrides is not None:
                raise ValueError(
                    "--config_overrides applies to a model trained from scratch (--model_type) and cannot be "
                    "combined with --model_name_or_path."
                )
        else:
            if self.model_type is None:
                raise ValueError(
                    "Pass --model_name_or_path (a Hub id or local folder) or --model_type marian|t5 to train "
                    "from scratch."
                )
            if self.config_name is not None:
                raise ValueError(
                    "--config_name replaces the config of --model_name_or_path; from scratch, describe the "
                    "model with --model_type and --config_overrides instead."
                )
        if not self.trains_tokenizer:
            for flag, value in (
                ("--train_tokenizer_vocab_size", self.train_tokenizer_vocab_size),
                ("--train_tokenizer_model", self.train_tokenizer_model),
            ):
                if value is not None:
                    raise ValueError(
                        f"{flag} only applies when a tokenizer is trained (--model_type without "
                        "--tokenizer_name); this run loads its tokenizer, so leave it unset."
                    )
        if self.train_tokenizer_vocab_size is not None and self.train_tokenizer_vocab_size <= 3:
            raise ValueError(
                f"--train_tokenizer_vocab_size must exceed the 3 special tokens, got {self.train_tokenizer_vocab_size}."
            )

    @property
    def trains_tokenizer(self) -> bool:
        return self.model_name_or_path is None and self.tokenizer_name is None


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how to preprocess it."""

    source_lang: str | None = field(
        default=None,
        metadata={"help": "Source language id (the key in the data, e.g. de; en_XX style codes use 'en')."},
    )
    target_lang: str | None = field(default=None, metadata={"help": "Target language id, e.g. en."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Data set on the Hub (or a local data set folder), via datasets."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of --dataset_name, e.g. de-en."}
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: json lines ({'translation': {SRC: ..., TGT: ...}} per line, .json/.jsonl) or "
            "csv/tsv with one column per language."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation data, same formats as --train_file."}
    )
    test_file: str | None = field(default=None, metadata={"help": "Test data, same formats as --train_file."})
    train_prefix: str | None = field(
        default=None,
        metadata={
            "help": "Training data as parallel text files, one sentence per line: PREFIX.SRC and PREFIX.TGT "
            "(or PREFIX.SRC.gz and PREFIX.TGT.gz), e.g. data/train reads data/train.de and data/train.en."
        },
    )
    validation_prefix: str | None = field(
        default=None, metadata={"help": "Validation data as parallel text files, like --train_prefix."}
    )
    test_prefix: str | None = field(
        default=None, metadata={"help": "Test data as parallel text files, like --train_prefix."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Recompute the tokenized data sets instead of reusing the cache."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Number of processes used to tokenize the data."}
    )
    max_source_length: int = field(
        default=1024, metadata={"help": "Source sequences are truncated to this many tokens."}
    )
    max_target_length: int = field(
        default=128, metadata={"help": "Training target sequences are truncated to this many tokens."}
    )
    val_max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "Validation/test targets are truncated to this many tokens, and it is the generation "
            "max_length of the final evaluate/predict unless --generation_max_length is set. Defaults to "
            "--max_target_length."
        },
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every sequence to the maximum length instead of the longest in each batch."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N validation examples."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N test examples."}
    )
    ignore_pad_token_for_loss: bool = field(
        default=True, metadata={"help": "Exclude padded label positions from the loss (label -100)."}
    )
    source_prefix: str | None = field(
        default=None, metadata={"help": "Text put before every source sentence (T5: 'translate X to Y: ')."}
    )
    forced_bos_token: str | None = field(
        default=None,
        metadata={
            "help": "Token forced as the first generated token, e.g. the target language code of mBART-50 "
            "or M2M100 (de_DE)."
        },
    )
    bleu_tokenize: str | None = field(
        default=None,
        metadata={
            "help": "sacrebleu tokenizer for BLEU (13a, intl, zh, ja-mecab, char, none, ...). Defaults to "
            "sacrebleu's choice for --target_lang (13a for most languages)."
        },
    )

    def __post_init__(self) -> None:
        if self.source_lang is None or self.target_lang is None:
            raise ValueError("Pass both --source_lang and --target_lang (e.g. --source_lang de --target_lang en).")
        if self.source_key == self.target_key:
            raise ValueError(
                f"--source_lang={self.source_lang!r} and --target_lang={self.target_lang!r} name the same "
                "language column."
            )
        local_flags = [f"--{split}_{kind}" for split in ("train", "validation", "test") for kind in ("file", "prefix")]
        given_local = [flag for flag in local_flags if getattr(self, flag[2:]) is not None]
        if self.dataset_name is not None and given_local:
            raise ValueError(
                f"--dataset_name={self.dataset_name!r} cannot be combined with {', '.join(given_local)}: use "
                "either a Hub data set or local files."
            )
        if self.dataset_name is None:
            if self.dataset_config_name is not None:
                raise ValueError("--dataset_config_name needs --dataset_name.")
            if not given_local:
                raise ValueError(
                    "No data: pass --dataset_name, or local files with --train_file/--validation_file/"
                    "--test_file (json lines, csv, tsv) or --train_prefix/--validation_prefix/--test_prefix "
                    "(parallel text)."
                )
        for split in ("train", "validation", "test"):
            data_file, prefix = getattr(self, f"{split}_file"), getattr(self, f"{split}_prefix")
            if data_file is not None and prefix is not None:
                raise ValueError(f"Pass only one of --{split}_file and --{split}_prefix.")
            if data_file is not None:
                if local_file_format(data_file) is None:
                    raise ValueError(
                        f"--{split}_file={data_file!r}: unsupported extension; use .json/.jsonl (json lines) "
                        "or .csv/.tsv (optionally .gz compressed)."
                    )
                if not os.path.isfile(data_file):
                    raise ValueError(f"--{split}_file={data_file!r}: no such file.")
        for flag in ("max_source_length", "max_target_length", "val_max_target_length"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be at least 1, got {value}.")
        for flag in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be at least 1, got {value}.")

    @property
    def source_key(self) -> str:
        # Multilingual tokenizers use codes such as en_XX while data sets key the text by "en".
        return self.source_lang.split("_")[0]

    @property
    def target_key(self) -> str:
        return self.target_lang.split("_")[0]


# ----------------------------------------------------------------------------------------------------------
# Data loading helpers
# ----------------------------------------------------------------------------------------------------------


def local_file_format(path: str) -> str | None:
    """The datasets builder ("json" or "csv") for a local data file, from its extension (.gz allowed)."""
    name = path[: -len(".gz")] if path.endswith(".gz") else path
    return LOCAL_FILE_FORMATS.get(name.rsplit(".", 1)[-1].lower()) if "." in name else None


def find_language_file(prefix: str, lang: str, flag: str) -> str:
    """PREFIX.LANG or PREFIX.LANG.gz; exactly one of them must exist."""
    candidates = [f"{prefix}.{lang}", f"{prefix}.{lang}.gz"]
    existing = [path for path in candidates if os.path.isfile(path)]
    if not existing:
        raise ValueError(f"{flag}={prefix!r}: found neither {candidates[0]} nor {candidates[1]}.")
    if len(existing) == 2:
        # Both could differ (a stale uncompressed copy); refusing is safer than picking one silently.
        raise ValueError(f"{flag}={prefix!r}: both {candidates[0]} and {candidates[1]} exist; keep only one.")
    return existing[0]


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 text file (gzip when it ends in .gz), split on '\\n' only.

    str.splitlines() would also split on characters such as U+2028 that can occur inside a sentence and
    would silently shift the alignment of parallel files.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}).") from err
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_parallel_text(prefix: str, source_key: str, target_key: str, flag: str) -> Dataset:
    """Parallel text files PREFIX.SRC / PREFIX.TGT as a data set with a transformers-style 'translation' column."""
    source_path = find_language_file(prefix, source_key, flag)
    target_path = find_language_file(prefix, target_key, flag)
    sources, targets = read_lines(source_path), read_lines(target_path)
    if len(sources) != len(targets):
        raise ValueError(
            f"{flag}={prefix!r}: misaligned parallel files: {source_path} has {len(sources)} lines but "
            f"{target_path} has {len(targets)} lines."
        )
    if not sources:
        raise ValueError(f"{flag}={prefix!r}: {source_path} and {target_path} are empty.")
    return Dataset.from_dict(
        {"translation": [{source_key: s, target_key: t} for s, t in zip(sources, targets, strict=True)]}
    )


def load_local_file(path: str, flag: str, cache_dir: str | None) -> Dataset:
    """A json lines or csv/tsv file as a data set (csv/tsv columns kept as text, never parsed as numbers)."""
    builder = local_file_format(path)
    if builder == "json":
        return load_dataset("json", data_files={"data": path}, split="data", cache_dir=cache_dir)
    is_tsv = path.removesuffix(".gz").lower().endswith(".tsv")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter="\t" if is_tsv else ","), None)
    if not header:
        raise ValueError(f"{flag}={path!r}: empty file, expected a header row naming the language columns.")
    return load_dataset(
        "csv",
        data_files={"data": path},
        split="data",
        cache_dir=cache_dir,
        delimiter="\t" if is_tsv else ",",
        # In tsv files quotes are ordinary characters of the text; csv files use standard quoting.
        quoting=csv.QUOTE_NONE if is_tsv else csv.QUOTE_MINIMAL,
        keep_default_na=False,  # a sentence such as "NA" or "null" stays text
        features=Features({column: Value("string") for column in header}),
    )


def to_translation_format(dataset: Dataset, source_key: str, target_key: str, origin: str) -> Dataset:
    """Check that both languages are present and return a data set with one 'translation' column.

    Accepts the transformers format ({'translation': {lang: text}}) and one column per language (csv/tsv).
    ``origin`` names the file or data set in error messages.
    """
    if "translation" in dataset.column_names:
        feature = dataset.features["translation"]
        if hasattr(feature, "languages"):  # datasets.Translation
            languages = list(feature.languages)
        elif isinstance(feature, dict):
            languages = list(feature)
        else:
            raise ValueError(f"{origin}: the 'translation' column must map languages to text, got {feature}.")
        for flag, key in (("--source_lang", source_key), ("--target_lang", target_key)):
            if key not in languages:
                raise ValueError(f"{flag} {key!r} is not in {origin}: its translations have languages {languages}.")
        if dataset.column_names == ["translation"]:
            return dataset
        return dataset.select_columns(["translation"])
    for flag, key in (("--source_lang", source_key), ("--target_lang", target_key)):
        if key not in dataset.column_names:
            raise ValueError(
                f"{flag} {key!r} is not in {origin}: expected a 'translation' column or one column per "
                f"language, found columns {dataset.column_names}."
            )

    def pack(batch: dict[str, list[Any]]) -> dict[str, list[dict[str, str]]]:
        return {
            "translation": [
                {source_key: s, target_key: t} for s, t in zip(batch[source_key], batch[target_key], strict=True)
            ]
        }

    return dataset.map(pack, batched=True, remove_columns=dataset.column_names, desc=f"Reading {origin}")


def load_raw_datasets(
    data_args: DataTrainingArguments, model_args: ModelArguments, needed_splits: list[str]
) -> DatasetDict:
    """The needed splits ('train', 'validation', 'test') in the transformers translation format."""
    raw: dict[str, Dataset] = {}
    if data_args.dataset_name is not None:
        check_hub_reachable_or_local(
            data_args.dataset_name, "--dataset_name", LOCAL_DATA_HINT, repo_type="dataset", cache_dir=model_args.cache_dir
        )
        with hub_load_errors(data_args.dataset_name, "--dataset_name", LOCAL_DATA_HINT):
            hub = load_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                cache_dir=model_args.cache_dir,
                token=model_args.token,
            )
        origin = data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
        for split in needed_splits:
            if split not in hub:
                raise ValueError(f"--dataset_name {origin} has no '{split}' split (it has {list(hub)}).")
            raw[split] = to_translation_format(
                hub[split], data_args.source_key, data_args.target_key, f"--dataset_name {origin} [{split}]"
            )
        return DatasetDict(raw)
    for split in needed_splits:
        data_file, prefix = getattr(data_args, f"{split}_file"), getattr(data_args, f"{split}_prefix")
        if prefix is not None:
            raw[split] = read_parallel_text(prefix, data_args.source_key, data_args.target_key, f"--{split}_prefix")
        elif data_file is not None:
            dataset = load_local_file(data_file, f"--{split}_file", model_args.cache_dir)
            raw[split] = to_translation_format(
                dataset, data_args.source_key, data_args.target_key, f"--{split}_file {data_file}"
            )
        else:
            raise ValueError(
                f"The {split} split is needed (by {SPLIT_FLAGS[split]}) but no data was given: pass "
                f"--{split}_file or --{split}_prefix."
            )
    return DatasetDict(raw)



# ----------------------------------------------------------------------------------------------------------
# Tokenizer and model helpers
# ----------------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, model: str) -> PreTrainedTokenizerFast:
    """A subword tokenizer trained on ``texts``, wrapped for transformers.

    Metaspace pre-tokenization makes decoding restore the original spacing (BLEU/chrF are computed on
    detokenized text), and every encoded sequence ends with </s>, as Marian and T5 expect.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    special_tokens = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    if model == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False)
    else:
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=special_tokens, unk_token=UNK_TOKEN, show_progress=False
        )
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN
    )


def scratch_config(model_type: str, tokenizer: Any, overrides: str | None) -> transformers.PretrainedConfig:
    """Default config of ``model_type`` wired to the tokenizer's vocabulary and special tokens, then
    ``overrides`` ("key=value,...") applied."""
    for token in ("pad_token", "eos_token"):
        if getattr(tokenizer, f"{token}_id") is None:
            raise ValueError(
                f"--tokenizer_name: the tokenizer has no {token}, which a {model_type} model needs (it pads with it "
                "and starts decoding from the pad token); use a tokenizer that defines both pad and eos tokens."
            )
    vocab_size = len(tokenizer)
    token_ids = {
        "vocab_size": vocab_size,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        # Marian and T5 both start decoding from the pad token.
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    if model_type == "marian":
        # Marian keeps a separate decoder vocabulary size (its default is the opus-mt one) and forces </s> at
        # max_length; both must follow the new tokenizer.
        token_ids.update(decoder_vocab_size=vocab_size, forced_eos_token_id=tokenizer.eos_token_id)
    config = CONFIG_MAPPING[model_type](**token_ids)
    if overrides:
        try:
            config.update_from_string(overrides)
        except ValueError as err:
            raise ValueError(f"--config_overrides={overrides!r}: {err}") from err
        if model_type == "marian" and "vocab_size" in overrides and "decoder_vocab_size" not in overrides:
            config.decoder_vocab_size = config.vocab_size
    for key in ("vocab_size", "decoder_vocab_size"):
        size = getattr(config, key, None)
        if size is not None and size < vocab_size:
            raise ValueError(
                f"--config_overrides sets {key}={size}, smaller than the tokenizer's {vocab_size} tokens."
            )
    return config


def strip_label_ids(row: Any, pad_token_id: int) -> list[int]:
    """Token ids of one label row without padding (-100 from the collator, pad from the gather/padding)."""
    return [int(token) for token in row if token != -100 and token != pad_token_id]


def build_compute_metrics(
    tokenizer: Any,
    label_ids: list[list[int]],
    references: list[str],
    bleu_tokenize: str | None,
    target_lang: str,
):
    """compute_metrics for one data set: BLEU and chrF of the generated text against the raw references.

    Evaluation gathers predictions from all processes and pads the last batches with duplicates, so there
    can be more rows than examples: the rows past the data set's size are dropped, and the remaining rows
    are checked against the data set's own labels, so each example is scored exactly once and against its
    own reference (the raw text, not the lossy decoded labels).
    """
    pad_token_id = tokenizer.pad_token_id
    expected = [strip_label_ids(row, pad_token_id) for row in label_ids]
    bleu = BLEU(tokenize=bleu_tokenize, trg_lang=target_lang)
    chrf = CHRF()

    def compute_metrics(eval_preds: transformers.EvalPrediction) -> dict[str, float]:
        predictions, labels = eval_preds.predictions, eval_preds.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        num_examples = len(references)
        if len(predictions) < num_examples:
            raise RuntimeError(f"Got {len(predictions)} predictions for {num_examples} examples.")
        predictions, labels = predictions[:num_examples], labels[:num_examples]
        for index, row in enumerate(labels):
            if strip_label_ids(row, pad_token_id) != expected[index]:
                raise RuntimeError(
                    f"Evaluation output row {index} does not belong to example {index}: predictions are not in "
                    "data set order, so metrics would use the wrong references."
                )
        predictions = np.where(predictions != -100, predictions, pad_token_id)
        hypotheses = [text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        generated_lengths = [np.count_nonzero(row != pad_token_id) for row in predictions]
        return {
            "bleu": round(bleu.corpus_score(hypotheses, [references]).score, 4),
            "chrf": round(chrf.corpus_score(hypotheses, [references]).score, 4),
            "gen_len": round(float(np.mean(generated_lengths)), 4),
        }

    return compute_metrics


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the usage docstring verbatim (its commands stay copy-pasteable) and every default."""


def main() -> None:
    # ------------------------------------------------------------------------------------------------------
    # 1. Arguments: flags, or a single .json/.yaml file holding them.
    # ------------------------------------------------------------------------------------------------------
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, LABOSeq2SeqTrainingArguments),
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    elif len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        model_args, data_args, training_args = parser.parse_yaml_file(yaml_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    # ------------------------------------------------------------------------------------------------------
    # 2. Logging: replicas log warnings only, unless --log_level_replica says otherwise.
    # ------------------------------------------------------------------------------------------------------
    configure_logging(logger, training_args)

    # ------------------------------------------------------------------------------------------------------
    # 3. Consistency of the run: what each stage needs, checked before anything is loaded.
    # ------------------------------------------------------------------------------------------------------
    check_launch_matches_world_size(training_args)
    if training_args.do_predict and not training_args.predict_with_generate:
        raise ValueError(
            "--do_predict writes generated translations and their BLEU/chrF; add --predict_with_generate."
        )
    if training_args.batch_eval_metrics and training_args.predict_with_generate:
        raise ValueError(
            "--batch_eval_metrics cannot be combined with --predict_with_generate here: corpus BLEU and chrF need "
            "all predictions at once."
        )
    needed_splits = [
        split
        for split, needed in zip(
            SPLITS, (training_args.do_train, training_args.do_eval, training_args.do_predict), strict=True
        )
        if needed
    ]
    if not needed_splits:
        raise ValueError("Nothing to do: pass --do_train, --do_eval and/or --do_predict.")
    for split in SPLITS:
        for kind in ("file", "prefix"):
            if getattr(data_args, f"{split}_{kind}") is not None and split not in needed_splits:
                raise ValueError(
                    f"--{split}_{kind} is given but unused: add {SPLIT_FLAGS[split]}, or drop --{split}_{kind}."
                )
        limit_flag = SAMPLE_LIMIT_FLAGS[split]
        if getattr(data_args, limit_flag) is not None and split not in needed_splits:
            raise ValueError(f"--{limit_flag} is given but unused: add {SPLIT_FLAGS[split]}, or drop --{limit_flag}.")
    if data_args.bleu_tokenize is not None and not training_args.predict_with_generate:
        raise ValueError("--bleu_tokenize applies to generated text: add --predict_with_generate.")
    if model_args.trains_tokenizer and not training_args.do_train:
        raise ValueError(
            "A model built from scratch (--model_type) without --tokenizer_name trains its tokenizer on the "
            "training data: add --do_train, or pass --model_name_or_path to evaluate a trained model."
        )
    if (
        data_args.source_prefix is None
        and model_args.model_name_or_path is not None
        and "t5" in model_args.model_name_or_path.lower()
    ):
        logger.warning(
            "You're running a T5 model but didn't provide a source prefix, which is expected, e.g. with "
            "`--source_prefix 'translate English to German: '`"
        )

    # ------------------------------------------------------------------------------------------------------
    # 4. Checkpoint to resume from (explicit --resume_from_checkpoint, else the last one in --output_dir).
    # ------------------------------------------------------------------------------------------------------
    checkpoint = resolve_checkpoint(training_args, logger)

    # Seed before the model is created, so that from-scratch initialization is reproducible.
    set_seed(training_args.seed)

    # ------------------------------------------------------------------------------------------------------
    # 5. Data: Hub data set, json lines / csv / tsv files, or parallel text files.
    # ------------------------------------------------------------------------------------------------------
    raw_datasets = load_raw_datasets(data_args, model_args, needed_splits)
    for split in needed_splits:
        limit = getattr(data_args, SAMPLE_LIMIT_FLAGS[split])
        if limit is not None:
            raw_datasets[split] = raw_datasets[split].select(range(min(limit, len(raw_datasets[split]))))
    source_key, target_key = data_args.source_key, data_args.target_key

    # ------------------------------------------------------------------------------------------------------
    # 6. Tokenizer: pretrained, from a checkpoint being resumed, or trained on the training text.
    # ------------------------------------------------------------------------------------------------------
    if not model_args.trains_tokenizer:
        tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
        tokenizer_flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
        check_hub_reachable_or_local(tokenizer_name, tokenizer_flag, LOCAL_MODEL_HINT, cache_dir=model_args.cache_dir)
        with hub_load_errors(tokenizer_name, tokenizer_flag, LOCAL_MODEL_HINT):
            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer_name,
                cache_dir=model_args.cache_dir,
                revision=model_args.model_revision,
                token=model_args.token,
                trust_remote_code=model_args.trust_remote_code,
            )
    elif checkpoint is not None:
        # Resuming: the checkpoint's tokenizer defines the ids its weights were trained with.
        try:
            tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        except OSError as err:
            raise ValueError(
                f"Checkpoint {checkpoint} holds no tokenizer to resume with; pass the tokenizer it was trained "
                "with as --tokenizer_name."
            ) from err
    else:
        # One process trains and saves the tokenizer, the others load that copy, so that all processes share
        # identical ids even if training were not deterministic (--output_dir is shared, as for checkpoints).
        with training_args.main_process_first(local=False, desc="tokenizer training"):
            if training_args.process_index == 0:
                train_translations = raw_datasets["train"]["translation"]
                texts = [pair[source_key] for pair in train_translations]
                texts += [pair[target_key] for pair in train_translations]
                vocab_size = model_args.train_tokenizer_vocab_size or DEFAULT_TOKENIZER_VOCAB_SIZE
                tokenizer_model = model_args.train_tokenizer_model or DEFAULT_TOKENIZER_MODEL
                logger.info(f"Training a {tokenizer_model} tokenizer (vocab_size={vocab_size}) on {len(texts)} texts")
                tokenizer = train_tokenizer(texts, vocab_size, tokenizer_model)
                tokenizer.save_pretrained(training_args.output_dir)
            else:
                tokenizer = AutoTokenizer.from_pretrained(training_args.output_dir)

    # ------------------------------------------------------------------------------------------------------
    # 7. Model: pretrained (Hub id or local folder) or built from scratch.
    # ------------------------------------------------------------------------------------------------------
    if model_args.model_name_or_path is not None:
        config_name = model_args.config_name or model_args.model_name_or_path
        config_flag = "--config_name" if model_args.config_name else "--model_name_or_path"
        check_hub_reachable_or_local(config_name, config_flag, LOCAL_MODEL_HINT, cache_dir=model_args.cache_dir)
        with hub_load_errors(config_name, config_flag, LOCAL_MODEL_HINT):
            config = AutoConfig.from_pretrained(
                config_name,
                cache_dir=model_args.cache_dir,
                revision=model_args.model_revision,
                token=model_args.token,
                trust_remote_code=model_args.trust_remote_code,
            )
        with hub_load_errors(model_args.model_name_or_path, "--model_name_or_path", LOCAL_MODEL_HINT):
            model = AutoModelForSeq2SeqLM.from_pretrained(
                model_args.model_name_or_path,
                config=config,
                cache_dir=model_args.cache_dir,
                revision=model_args.model_revision,
                token=model_args.token,
                trust_remote_code=model_args.trust_remote_code,
            )
        # Resize only when the tokenizer has more tokens than the embeddings (index errors otherwise); a larger
        # embedding matrix than the vocabulary is common and harmless.
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        config = scratch_config(model_args.model_type, tokenizer, model_args.config_overrides)
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        logger.info(
            f"Training a new {model_args.model_type} model from scratch: "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
        )

    # Multilingual tokenizers (mBART, M2M100, NLLB) need the language codes to build inputs and targets.
    if hasattr(tokenizer, "src_lang") and hasattr(tokenizer, "tgt_lang"):
        tokenizer.src_lang = data_args.source_lang
        tokenizer.tgt_lang = data_args.target_lang
    if data_args.forced_bos_token is not None:
        forced_bos_token_id = tokenizer.convert_tokens_to_ids(data_args.forced_bos_token)
        if forced_bos_token_id is None or forced_bos_token_id == tokenizer.unk_token_id:
            raise ValueError(f"--forced_bos_token={data_args.forced_bos_token!r} is not a token of the tokenizer.")
        model.generation_config.forced_bos_token_id = forced_bos_token_id
    if model.config.decoder_start_token_id is None:
        raise ValueError("The model config has no decoder_start_token_id; set it in the config (--config_name).")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    # Only models with absolute position embeddings have a hard length limit (T5's attention is relative).
    if max_positions is not None and not hasattr(model.config, "relative_attention_max_distance"):
        for flag in ("max_source_length", "max_target_length", "val_max_target_length"):
            value = getattr(data_args, flag)
            if value is not None and value > max_positions:
                raise ValueError(
                    f"--{flag}={value} exceeds the model's {max_positions} position embeddings; "
                    f"lower --{flag} to at most {max_positions}."
                )

    # ------------------------------------------------------------------------------------------------------
    # 8. Preprocessing: tokenize sources (with --source_prefix) and targets.
    # ------------------------------------------------------------------------------------------------------
    prefix = data_args.source_prefix or ""
    padding = "max_length" if data_args.pad_to_max_length else False
    eval_target_length = data_args.val_max_target_length or data_args.max_target_length

    def make_preprocess(max_target_length: int):
        def preprocess(examples: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
            inputs = [prefix + pair[source_key] for pair in examples["translation"]]
            targets = [pair[target_key] for pair in examples["translation"]]
            model_inputs = tokenizer(inputs, max_length=data_args.max_source_length, padding=padding, truncation=True)
            labels = tokenizer(text_target=targets, max_length=max_target_length, padding=padding, truncation=True)
            # With padding to max_length the pad ids sit inside the labels; -100 keeps them out of the loss.
            if padding == "max_length" and data_args.ignore_pad_token_for_loss:
                labels["input_ids"] = [
                    [(token if token != tokenizer.pad_token_id else -100) for token in label]
                    for label in labels["input_ids"]
                ]
            model_inputs["labels"] = labels["input_ids"]
            return model_inputs

        return preprocess

    tokenized: dict[str, Dataset] = {}
    for split in needed_splits:
        max_target_length = data_args.max_target_length if split == "train" else eval_target_length
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            tokenized[split] = raw_datasets[split].map(
                make_preprocess(max_target_length),
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=raw_datasets[split].column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Running tokenizer on {split} dataset",
            )
    train_dataset, eval_dataset, predict_dataset = (tokenized.get(split) for split in SPLITS)

    # Padding to a multiple of 8 lets fp16/bf16 kernels use tensor cores.
    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    else:
        data_collator = DataCollatorForSeq2Seq(
            tokenizer,
            model=model,
            label_pad_token_id=-100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
            pad_to_multiple_of=8 if (training_args.fp16 or training_args.bf16) else None,
        )

    # ------------------------------------------------------------------------------------------------------
    # 9. Metrics: sacrebleu BLEU and chrF on detokenized text, one score per example.
    # ------------------------------------------------------------------------------------------------------
    def metrics_for(split: str):
        if not training_args.predict_with_generate:
            return None  # without generation there is no text to score; loss and eval_nll are still reported
        references = [pair[target_key] for pair in raw_datasets[split]["translation"]]
        return build_compute_metrics(
            tokenizer, tokenized[split]["labels"], references, data_args.bleu_tokenize, data_args.target_lang
        )

    # ------------------------------------------------------------------------------------------------------
    # 10. Trainer with the label regularizer selected by --label_regularizer.
    # ------------------------------------------------------------------------------------------------------
    trainer = LABOSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=metrics_for("validation") if eval_dataset is not None else None,
    )

    # ------------------------------------------------------------------------------------------------------
    # 11. Training (resuming from the checkpoint found in stage 4, if any).
    # ------------------------------------------------------------------------------------------------------
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # saves the tokenizer too, so the folder reloads with AutoTokenizer
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    # Generation length of the final evaluation: --generation_max_length, else the evaluation target length.
    # The number of beams comes from --generation_num_beams through the trainer.
    max_length = training_args.generation_max_length or eval_target_length

    # ------------------------------------------------------------------------------------------------------
    # 12. Evaluation on the validation split.
    # ------------------------------------------------------------------------------------------------------
    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(max_length=max_length, metric_key_prefix="eval")
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # ------------------------------------------------------------------------------------------------------
    # 13. Prediction on the test split, written to generated_predictions.txt (one line per example).
    # ------------------------------------------------------------------------------------------------------
    if training_args.do_predict:
        logger.info("*** Predict ***")
        trainer.compute_metrics = metrics_for("test")
        predict_results = trainer.predict(predict_dataset, metric_key_prefix="predict", max_length=max_length)
        metrics = predict_results.metrics
        metrics["predict_samples"] = len(predict_dataset)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero():
            # Rows past the data set's size are the duplicates that pad the last batches across processes.
            predictions = predict_results.predictions[: len(predict_dataset)]
            predictions = np.where(predictions != -100, predictions, tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(predictions, skip_special_tokens=True)
            output_prediction_file = os.path.join(training_args.output_dir, "generated_predictions.txt")
            with open(output_prediction_file, "w", encoding="utf-8") as writer:
                # A newline inside a generated text would shift every later line against the test set.
                writer.writelines(" ".join(text.split("\n")).strip() + "\n" for text in texts)

    # ------------------------------------------------------------------------------------------------------
    # 14. Model card naming the regularizer and its hyperparameters; --push_to_hub uploads it with the model.
    # ------------------------------------------------------------------------------------------------------
    if data_args.dataset_name is not None:
        dataset_description = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            dataset_description += f" {data_args.dataset_config_name}"
    else:
        # Without a name the card would read "the None dataset"; name the local files instead.
        local_data = [getattr(data_args, f"{split}_{kind}") for split in SPLITS for kind in ("file", "prefix")]
        names = ", ".join(os.path.basename(path) for path in local_data if path is not None)
        dataset_description = f"local {source_key}-{target_key} data ({names})"
    card_kwargs = labo_model_card_kwargs(
        training_args,
        tasks="translation",
        dataset=dataset_description,
        dataset_tags=data_args.dataset_name,
        dataset_args=data_args.dataset_config_name,
        finetuned_from=model_args.model_name_or_path,
        language=[source_key, target_key],
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)


if __name__ == "__main__":
    main()
    shutdown_distributed()
