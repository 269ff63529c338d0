#!/usr/bin/env python
"""Train, evaluate and run translation models with LABO label regularization (optimal label smoothing).

The transformers `run_translation.py` recipe with the loss swapped: `LABOSeq2SeqTrainer` trains with
``--label_regularizer labo`` (default), ``label_smoothing`` or ``cross_entropy``, so the baselines run through
this same script. BLEU and chrF are computed with sacrebleu on detokenized text, each example counted once.

Usage (copy-paste; replace the data paths):

    # From scratch: a small Marian model and a BPE tokenizer trained on the training data (Multi30k de->en,
    # parallel text files train.de.gz / train.en.gz, ...), with the script's from-scratch recipe (below).
    python run_translation.py --model_type marian \\
        --train_prefix /path/to/multi30k/train --validation_prefix /path/to/multi30k/val \\
        --test_prefix /path/to/multi30k/test_2016_flickr --source_lang de --target_lang en \\
        --do_train --do_eval --do_predict --predict_with_generate \\
        --label_regularizer labo --output_dir outputs/marian-multi30k-labo

    # The label-smoothing baseline: the same with --label_regularizer label_smoothing (and no --labo_temperature)

    # Fine-tune a pretrained MarianMT model (Hub id or local folder) on json lines
    # ({"translation": {"de": "...", "en": "..."}} per line; csv/tsv with one column per language also work).
    python run_translation.py \\
        --model_name_or_path Helsinki-NLP/opus-mt-de-en \\
        --train_file train.jsonl --validation_file val.jsonl --source_lang de --target_lang en \\
        --do_train --do_eval --predict_with_generate --output_dir outputs/opus-mt-de-en-labo

    # T5 needs a task prefix; a from-scratch T5 is --model_type t5 with T5 keys in --config_overrides
    # (e.g. "d_model=256,d_ff=1024,num_layers=3,num_decoder_layers=3,num_heads=4,d_kv=64").
    python run_translation.py \\
        --model_name_or_path google-t5/t5-small --source_prefix "translate English to German: " \\
        --dataset_name wmt/wmt16 --dataset_config_name de-en --source_lang en --target_lang de \\
        --do_train --do_eval --predict_with_generate --output_dir outputs/t5-small-wmt16-labo

    python run_translation.py args.json        # or args.yaml: all arguments from one file (keys = flags)

Outputs in --output_dir: the model with its tokenizer (reloadable with AutoModelForSeq2SeqLM /
AutoTokenizer), checkpoints (resumed automatically, or pick one with --resume_from_checkpoint),
{train,eval,predict,all}_results.json (eval_bleu, eval_chrf, eval_nll, predict_bleu, ...),
generated_predictions.txt with --do_predict, and a model card (README.md) naming the regularizer.

Defaults of this script for a model trained from scratch (--model_type without --model_name_or_path; each
applies only when the flag is not set, and the ones applied are logged as "Script defaults applied"):
--config_overrides with a 1.1M-parameter Marian (d_model 128, 2+2 layers; a T5 of the same sizes),
--train_tokenizer_vocab_size 3000, --learning_rate 1e-3 --warmup_steps 0.1 --weight_decay 1e-4
--num_train_epochs 3 --per_device_train_batch_size 64 --per_device_eval_batch_size 128 --logging_steps 25
--max_source_length 128 --max_target_length 128 --train_sampling_strategy group_by_length; on CPU without
OMP_NUM_THREADS, the default model uses one thread. transformers' defaults (lr 5e-5, batch 8) suit fine-tuning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import transformers
from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import SequentialSampler
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq

from labo_hf import LABOSeq2SeqTrainer, LABOSeq2SeqTrainingArguments
from labo_hf.examples.data_checks import drop_blank_text_pairs
from labo_hf.examples.early_checks import check_sources, check_trainer_flags, one_thread_for_small_model
from labo_hf.examples.launch import hub_load_errors, shutdown_distributed
from labo_hf.examples.launch_lines import launch_help
from labo_hf.examples.output_folder import TOKENIZER_STAGING
from labo_hf.examples.runtime import (
    ExampleDataArguments,
    ExampleModelArguments,
    argument,
    load_hub_or_local,
    parse_args,
    start_run,
    train_evaluate_predict,
)
from labo_hf.examples.seq2seq_from_scratch import (
    SCRATCH_MODEL_TYPES,
    SCRATCH_TOKENIZER_VOCAB_SIZE,
    TOKENIZER_MODELS,
    check_max_positions,
    check_scratch_config,
    scratch_config,
    scratch_script_defaults,
    train_tokenizer,
)
from labo_hf.examples.translation_data import (
    find_language_file,
    load_local_file,
    local_file_format,
    read_parallel_text,
    to_translation_format,
)
from labo_hf.examples.translation_metrics import build_compute_metrics, prediction_writer

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER_MODEL = "bpe"
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


# ---- Arguments ----


@dataclass
class ModelArguments(ExampleModelArguments):
    """Which model and tokenizer to train: pretrained (--model_name_or_path) or from scratch (--model_type)."""

    model_type: str | None = argument(
        "Train a model of this type from scratch, with its default configuration modified by --config_overrides "
        "(e.g. 'd_model=64,encoder_layers=2,decoder_layers=2' for Marian).",
        choices=list(SCRATCH_MODEL_TYPES),
    )
    tokenizer_name: str | None = argument(
        "Pretrained tokenizer name or path, if not the one of --model_name_or_path. From scratch without it, a "
        "tokenizer is trained on the training data."
    )
    train_tokenizer_vocab_size: int | None = argument(
        "Vocabulary size of the tokenizer trained on the source and target training text (from scratch without "
        f"--tokenizer_name only). Defaults to {SCRATCH_TOKENIZER_VOCAB_SIZE} there."
    )
    train_tokenizer_model: str | None = argument(
        "Subword model of the trained tokenizer (from scratch without --tokenizer_name only). Defaults to "
        f"{DEFAULT_TOKENIZER_MODEL} there. bpe training is reproducible; the tokenizers library's unigram trainer "
        "gives a slightly different vocabulary on every run.",
        choices=list(TOKENIZER_MODELS),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_name_or_path is None and self.model_type is None:
            raise ValueError(
                "Pass --model_name_or_path (a Hub id or local folder) or --model_type marian|t5 to train from scratch."
            )
        if self.model_name_or_path is None and self.config_name is not None:
            raise ValueError(
                "--config_name replaces the config of --model_name_or_path; from scratch, describe the model "
                "with --model_type and --config_overrides instead."
            )
        for flag in ("train_tokenizer_vocab_size", "train_tokenizer_model"):
            if getattr(self, flag) is not None and not self.trains_tokenizer:
                raise ValueError(
                    f"--{flag} only applies when a tokenizer is trained (--model_type without --tokenizer_name); "
                    "this run loads its tokenizer, so leave it unset."
                )
        if self.train_tokenizer_vocab_size is not None and self.train_tokenizer_vocab_size <= 3:
            raise ValueError(
                f"--train_tokenizer_vocab_size must exceed the 3 special tokens, got {self.train_tokenizer_vocab_size}."
            )

    @property
    def trains_tokenizer(self) -> bool:
        return self.model_name_or_path is None and self.tokenizer_name is None


@dataclass
class DataTrainingArguments(ExampleDataArguments):
    """Which data to train and evaluate on, and how to preprocess it."""

    source_lang: str | None = argument("Source language id (the key in the data, e.g. de; en_XX style codes use 'en').")
    target_lang: str | None = argument("Target language id, e.g. en.")
    train_file: str | None = argument(
        "Training data: json lines ({'translation': {SRC: ..., TGT: ...}} per line, .json/.jsonl) or csv/tsv "
        "with one column per language."
    )
    validation_file: str | None = argument("Validation data, same formats as --train_file.")
    test_file: str | None = argument("Test data, same formats as --train_file.")
    train_prefix: str | None = argument(
        "Training data as parallel text files, one sentence per line: PREFIX.SRC and PREFIX.TGT (or PREFIX.SRC.gz "
        "and PREFIX.TGT.gz), e.g. data/train reads data/train.de and data/train.en."
    )
    validation_prefix: str | None = argument("Validation data as parallel text files, like --train_prefix.")
    test_prefix: str | None = argument("Test data as parallel text files, like --train_prefix.")
    overwrite_cache: bool = argument("Recompute the tokenized data sets instead of reusing the cache.", False)
    preprocessing_num_workers: int | None = argument("Number of processes used to tokenize the data.")
    max_source_length: int = argument("Source sequences are truncated to this many tokens.", 1024)
    max_target_length: int = argument("Training target sequences are truncated to this many tokens.", 128)
    val_max_target_length: int | None = argument(
        "Validation/test targets are truncated to this many tokens, and it is the generation max_length of the "
        "final evaluate/predict unless --generation_max_length is set. Defaults to --max_target_length."
    )
    pad_to_max_length: bool = argument(
        "Pad every sequence to the maximum length instead of the longest in each batch.", False
    )
    ignore_pad_token_for_loss: bool = argument("Exclude padded label positions from the loss (label -100).", True)
    source_prefix: str | None = argument("Text put before every source sentence (T5: 'translate X to Y: ').")
    forced_bos_token: str | None = argument(
        "Token forced as the first generated token, e.g. the target language code of mBART-50 or M2M100 (de_DE)."
    )
    bleu_tokenize: str | None = argument(
        "sacrebleu tokenizer for BLEU (13a, intl, zh, ja-mecab, char, none, ...). Defaults to sacrebleu's "
        "choice for --target_lang (13a for most languages)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source_lang is None or self.target_lang is None:
            raise ValueError("Pass both --source_lang and --target_lang (e.g. --source_lang de --target_lang en).")
        if self.source_key == self.target_key:
            raise ValueError(
                f"--source_lang={self.source_lang!r} and --target_lang={self.target_lang!r} name the same "
                "language column."
            )
        given_local = [f"--{split}_{kind}" for split in SPLITS for kind in ("file", "prefix")]
        given_local = [flag for flag in given_local if getattr(self, flag[2:]) is not None]
        if self.dataset_name is not None and given_local:
            raise ValueError(
                f"--dataset_name={self.dataset_name!r} cannot be combined with {', '.join(given_local)}: use "
                "either a Hub data set or local files."
            )
        if self.dataset_name is None and not given_local:
            raise ValueError(
                "No data: pass --dataset_name, or local files with --train_file/--validation_file/--test_file "
                "(json lines, csv, tsv) or --train_prefix/--validation_prefix/--test_prefix (parallel text)."
            )
        for split in SPLITS:
            data_file, prefix = getattr(self, f"{split}_file"), getattr(self, f"{split}_prefix")
            if data_file is not None and prefix is not None:
                raise ValueError(f"Pass only one of --{split}_file and --{split}_prefix.")
            if data_file is not None and local_file_format(data_file) is None:
                raise ValueError(
                    f"--{split}_file={data_file!r}: unsupported extension; use .json/.jsonl (json lines) or "
                    ".csv/.tsv (optionally .gz compressed)."
                )
            if data_file is not None and not os.path.isfile(data_file):
                raise ValueError(f"--{split}_file={data_file!r}: no such file.")
        for flag in ("max_source_length", "max_target_length", "val_max_target_length"):
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

    @property
    def lengths(self) -> dict[str, int | None]:
        return {flag: getattr(self, flag) for flag in ("max_source_length", "max_target_length", "val_max_target_length")}

    @property
    def eval_target_length(self) -> int:
        return self.val_max_target_length or self.max_target_length


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, Any, dict[str, str]]:
    """The three argument dataclasses from flags or one .json/.yaml file, with the from-scratch defaults for the
    flags left unset, checked against each other. Returns them and the script defaults applied."""
    (model_args, data_args, training_args), applied = parse_args(
        (ModelArguments, DataTrainingArguments, LABOSeq2SeqTrainingArguments), argv,
        description=__doc__ + launch_help("run_translation.py"),
        script_defaults=scratch_script_defaults,
    )
    if training_args.do_predict and not training_args.predict_with_generate:
        raise ValueError("--do_predict writes generated translations and their BLEU/chrF; add --predict_with_generate.")
    if training_args.batch_eval_metrics and training_args.predict_with_generate:
        raise ValueError(
            "--batch_eval_metrics cannot be combined with --predict_with_generate here: corpus BLEU and chrF need "
            "all predictions at once."
        )
    splits = needed_splits(training_args)
    if not splits:
        raise ValueError("Nothing to do: pass --do_train, --do_eval and/or --do_predict.")
    for split in SPLITS:
        for flag in (f"{split}_file", f"{split}_prefix", SAMPLE_LIMIT_FLAGS[split]):
            if getattr(data_args, flag) is not None and split not in splits:
                raise ValueError(f"--{flag} is given but unused: add {SPLIT_FLAGS[split]}, or drop --{flag}.")
    if data_args.bleu_tokenize is not None and not training_args.predict_with_generate:
        raise ValueError("--bleu_tokenize applies to generated text: add --predict_with_generate.")
    if model_args.trains_tokenizer and not training_args.do_train:
        raise ValueError(
            "A model built from scratch (--model_type) without --tokenizer_name trains its tokenizer on the "
            "training data: add --do_train, or pass --model_name_or_path to evaluate a trained model."
        )
    check_before_work(model_args, data_args, training_args, splits)
    return model_args, data_args, training_args, applied


def check_before_work(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: Any, splits: list[str]
) -> None:
    """What would otherwise be refused only after data, tokenizer or model work, with files in --output_dir."""
    check_trainer_flags(training_args, "sequence-to-sequence models")
    metric = (training_args.metric_for_best_model or "").removeprefix("eval_")
    if metric in ("bleu", "chrf", "gen_len") and not training_args.predict_with_generate:
        raise ValueError(f"--metric_for_best_model {metric} is computed on generated text: add --predict_with_generate.")
    for split in splits if data_args.dataset_name is None else ():
        prefix = getattr(data_args, f"{split}_prefix")
        if prefix is None and getattr(data_args, f"{split}_file") is None:
            raise ValueError(
                f"The {split} split is needed (by {SPLIT_FLAGS[split]}) but no data was given: pass "
                f"--{split}_file or --{split}_prefix."
            )
    if model_args.model_type is not None:
        check_scratch_config(model_args.model_type, model_args.config_overrides, data_args.lengths)


def check_inputs_exist(model_args: ModelArguments, data_args: DataTrainingArguments, splits: list[str]) -> None:
    """The parallel text files, models and data sets named by the flags exist, before any work."""
    for split in splits if data_args.dataset_name is None else ():
        prefix = getattr(data_args, f"{split}_prefix")
        for key in (data_args.source_key, data_args.target_key) if prefix is not None else ():
            find_language_file(prefix, key, f"--{split}_prefix")
    check_sources(model_args, ("model_name_or_path", "config_name", "tokenizer_name"), LOCAL_MODEL_HINT,
                  data_args.dataset_name, LOCAL_DATA_HINT)


def needed_splits(training_args: Any) -> list[str]:
    wanted = (training_args.do_train, training_args.do_eval, training_args.do_predict)
    return [split for split, needed in zip(SPLITS, wanted, strict=True) if needed]


# ---- Data ----


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments, splits: list[str]) -> DatasetDict:
    """The needed splits ('train', 'validation', 'test') in the transformers translation format, each cut to
    its --max_*_samples."""
    raw: dict[str, Dataset] = {}
    source_key, target_key = data_args.source_key, data_args.target_key
    if data_args.dataset_name is not None:
        name, config = data_args.dataset_name, data_args.dataset_config_name
        hub = load_hub_or_local(load_dataset, name, "--dataset_name", LOCAL_DATA_HINT, repo_type="dataset",
                                name=config, cache_dir=model_args.cache_dir, token=model_args.token)
        origin = name + (f" ({config})" if config else "")
        for split in splits:
            if split not in hub:
                raise ValueError(f"--dataset_name {origin} has no '{split}' split (it has {list(hub)}).")
            raw[split] = to_translation_format(hub[split], source_key, target_key, f"--dataset_name {origin} [{split}]")
    for split in splits if data_args.dataset_name is None else ():
        data_file, prefix = getattr(data_args, f"{split}_file"), getattr(data_args, f"{split}_prefix")
        if prefix is not None:
            raw[split] = read_parallel_text(prefix, source_key, target_key, f"--{split}_prefix")
        else:  # one of the two is given (check_before_work)
            dataset = load_local_file(data_file, f"--{split}_file", model_args.cache_dir)
            raw[split] = to_translation_format(dataset, source_key, target_key, f"--{split}_file {data_file}")
    for split in splits:
        # Blank pairs dropped (a file of blank lines would train "successfully"); test pairs only counted.
        source = data_args.dataset_name or getattr(data_args, f"{split}_prefix") or getattr(data_args, f"{split}_file")
        raw[split], _ = drop_blank_text_pairs(raw[split], source_key, target_key, where=f"The {split} data {source}",
                                              drop=split != "test", logger=logger)  # fmt: skip
        limit = getattr(data_args, SAMPLE_LIMIT_FLAGS[split])
        if limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return DatasetDict(raw)


# ---- Tokenizer and model ----


def load_tokenizer(
    model_args: ModelArguments, training_args: Any, raw_datasets: DatasetDict, data_args: DataTrainingArguments,
    checkpoint: str | None,
) -> Any:
    """The tokenizer: pretrained, from the checkpoint being resumed, or trained on the training text."""
    if not model_args.trains_tokenizer:
        name = model_args.tokenizer_name or model_args.model_name_or_path
        flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
        return load_hub_or_local(AutoTokenizer.from_pretrained, name, flag, LOCAL_MODEL_HINT, **model_args.hub_kwargs)
    if checkpoint is not None:
        # Resuming: the checkpoint's tokenizer defines the ids its weights were trained with.
        try:
            return AutoTokenizer.from_pretrained(checkpoint)
        except OSError as err:
            raise ValueError(
                f"Checkpoint {checkpoint} holds no tokenizer to resume with; pass the tokenizer it was trained "
                "with as --tokenizer_name."
            ) from err
    # One process trains and saves the tokenizer, the others load that copy, so that all processes share
    # identical ids even if training were not deterministic (--output_dir is shared, as for checkpoints).
    with training_args.main_process_first(local=False, desc="tokenizer training"):
        if training_args.process_index != 0:
            return AutoTokenizer.from_pretrained(os.path.join(training_args.output_dir, TOKENIZER_STAGING))
        pairs = raw_datasets["train"]["translation"]
        texts = [pair[data_args.source_key] for pair in pairs] + [pair[data_args.target_key] for pair in pairs]
        vocab_size = model_args.train_tokenizer_vocab_size or int(SCRATCH_TOKENIZER_VOCAB_SIZE)
        tokenizer_model = model_args.train_tokenizer_model or DEFAULT_TOKENIZER_MODEL
        logger.info(f"Training a {tokenizer_model} tokenizer (vocab_size={vocab_size}) on {len(texts)} texts")
        tokenizer = train_tokenizer(texts, vocab_size, tokenizer_model)
        # Shared through labo-hf's staging folder: the output folder is not claimed before training starts.
        tokenizer.save_pretrained(os.path.join(training_args.output_dir, TOKENIZER_STAGING))
        return tokenizer


def load_model(model_args: ModelArguments, data_args: DataTrainingArguments, tokenizer: Any) -> Any:
    """The model: pretrained (Hub id or local folder) or built from scratch, wired to the tokenizer."""
    if model_args.model_name_or_path is not None:
        config_name = model_args.config_name or model_args.model_name_or_path
        config_flag = "--config_name" if model_args.config_name else "--model_name_or_path"
        config = load_hub_or_local(
            AutoConfig.from_pretrained, config_name, config_flag, LOCAL_MODEL_HINT, **model_args.hub_kwargs
        )
        with hub_load_errors(model_args.model_name_or_path, "--model_name_or_path", LOCAL_MODEL_HINT):
            model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, config=config,
                                                          **model_args.hub_kwargs)
        # Resize only when the tokenizer has more tokens than the embeddings (index errors otherwise); a larger
        # embedding matrix than the vocabulary is common and harmless.
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        config = scratch_config(model_args.model_type, tokenizer, model_args.config_overrides)
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        size = sum(p.numel() for p in model.parameters()) / 1e6
        logger.info(f"Training a new {model_args.model_type} model from scratch: {size:.2f}M parameters")

    # Multilingual tokenizers (mBART, M2M100, NLLB) need the language codes to build inputs and targets.
    if hasattr(tokenizer, "src_lang") and hasattr(tokenizer, "tgt_lang"):
        tokenizer.src_lang, tokenizer.tgt_lang = data_args.source_lang, data_args.target_lang
    if data_args.forced_bos_token is not None:
        forced_bos_token_id = tokenizer.convert_tokens_to_ids(data_args.forced_bos_token)
        if forced_bos_token_id is None or forced_bos_token_id == tokenizer.unk_token_id:
            raise ValueError(f"--forced_bos_token={data_args.forced_bos_token!r} is not a token of the tokenizer.")
        model.generation_config.forced_bos_token_id = forced_bos_token_id
    if model.config.decoder_start_token_id is None:
        raise ValueError("The model config has no decoder_start_token_id; set it in the config (--config_name).")
    check_max_positions(model.config, data_args.lengths)
    return model


# ---- Preprocessing, metrics and outputs ----


def tokenize_datasets(
    raw_datasets: DatasetDict, tokenizer: Any, data_args: DataTrainingArguments, training_args: Any
) -> dict[str, Dataset]:
    """Sources (with --source_prefix) and targets as token ids, per split."""
    prefix = data_args.source_prefix or ""
    padding = "max_length" if data_args.pad_to_max_length else False
    source_key, target_key = data_args.source_key, data_args.target_key

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
    for split, dataset in raw_datasets.items():
        max_target_length = data_args.max_target_length if split == "train" else data_args.eval_target_length
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            tokenized[split] = dataset.map(
                make_preprocess(max_target_length),
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=dataset.column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Running tokenizer on {split} dataset",
            )
    return tokenized


def dataset_description(data_args: DataTrainingArguments) -> str:
    """The data set's name for the model card; without a name it would read "the None dataset"."""
    if data_args.dataset_name is not None:
        return " ".join(filter(None, (data_args.dataset_name, data_args.dataset_config_name)))
    local_data = [getattr(data_args, f"{split}_{kind}") for split in SPLITS for kind in ("file", "prefix")]
    names = ", ".join(os.path.basename(path) for path in local_data if path is not None)
    return f"local {data_args.source_key}-{data_args.target_key} data ({names})"


class TranslationTrainer(LABOSeq2SeqTrainer):
    """BLEU pairs each generated text with its reference by position, so evaluation keeps the data set order
    under --train_sampling_strategy group_by_length too (transformers would sort evaluation by length)."""

    def _get_eval_sampler(self, eval_dataset: Dataset) -> Any:
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        # What transformers uses without length grouping: sequential, or sharded in order by accelerate.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


def main(argv: list[str] | None = None) -> dict[str, float]:
    # 1. Arguments: flags, or a single .json/.yaml file holding them, checked before anything is loaded.
    model_args, data_args, training_args, applied_defaults = parse_arguments(argv)
    check_inputs_exist(model_args, data_args, needed_splits(training_args))
    if data_args.source_prefix is None and "t5" in (model_args.model_name_or_path or "").lower():
        logger.warning("A T5 model expects a task prefix, e.g. --source_prefix 'translate English to German: '")

    # 2. Logging, the launch check, the checkpoint to resume from (--resume_from_checkpoint, else the last one
    #    in --output_dir), and the seed.
    checkpoint, identity = start_run(logger, training_args, applied_defaults, model_args=model_args,
                                     data_args=data_args)
    if "config_overrides" in applied_defaults:
        one_thread_for_small_model(logger, training_args.device.type, f"The default small {model_args.model_type}")

    # 3. Data: Hub data set, json lines / csv / tsv files, or parallel text files.
    raw_datasets = load_raw_datasets(data_args, model_args, needed_splits(training_args))

    # 4. Tokenizer and model: pretrained, or from scratch with a tokenizer trained on the training text.
    tokenizer = load_tokenizer(model_args, training_args, raw_datasets, data_args, checkpoint)
    model = load_model(model_args, data_args, tokenizer)

    # 5. Preprocessing: tokenized sources and targets, and the collator that pads them.
    tokenized = tokenize_datasets(raw_datasets, tokenizer, data_args, training_args)
    if data_args.pad_to_max_length:
        data_collator = transformers.default_data_collator
    else:
        data_collator = DataCollatorForSeq2Seq(
            tokenizer,
            model=model,
            label_pad_token_id=-100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
            # Padding to a multiple of 8 lets fp16/bf16 kernels use tensor cores.
            pad_to_multiple_of=8 if (training_args.fp16 or training_args.bf16) else None,
        )

    # 6. Metrics: sacrebleu BLEU and chrF on detokenized text, one score per example. Without generation there
    #    is no text to score; the loss and eval_nll are still reported.
    def metrics_for(split: str):
        if not training_args.predict_with_generate or split not in tokenized:
            return None
        references = [pair[data_args.target_key] for pair in raw_datasets[split]["translation"]]
        return build_compute_metrics(
            tokenizer, tokenized[split]["labels"], references, data_args.bleu_tokenize, data_args.target_lang
        )

    # 7. Trainer with the label regularizer selected by --label_regularizer.
    trainer = TranslationTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=metrics_for("validation"),
        run_identity=identity,
    )

    # 8. Training, evaluation, prediction (generated_predictions.txt) and the model card. The final
    #    evaluations generate up to --generation_max_length tokens, else the evaluation target length.
    generation = {"max_length": training_args.generation_max_length or data_args.eval_target_length}
    predict_dataset = tokenized.get("test")
    return train_evaluate_predict(
        trainer,
        checkpoint=checkpoint,
        predict_dataset=predict_dataset,
        eval_kwargs=generation,
        predict_kwargs=generation,
        predict_metrics=metrics_for("test"),
        write_predictions=prediction_writer(tokenizer, training_args.output_dir, len(predict_dataset or ())),
        model_card={
            "tasks": "translation", "dataset": dataset_description(data_args), "dataset_tags": data_args.dataset_name,
            "dataset_args": data_args.dataset_config_name, "finetuned_from": model_args.model_name_or_path,
            "language": [data_args.source_key, data_args.target_key],
        },  # fmt: skip
    )


if __name__ == "__main__":
    main()
    shutdown_distributed()
