"""A sequence-to-sequence model from scratch for ``run_translation.py``: a subword tokenizer trained on the
training text, and a Marian or T5 config wired to its vocabulary and special tokens."""

from __future__ import annotations

from typing import Any

from transformers import CONFIG_MAPPING, PretrainedConfig, PreTrainedTokenizerFast

from labo_hf.examples.cli_args import apply_config_overrides

__all__ = [
    "SCRATCH_CONFIG_OVERRIDES",
    "SCRATCH_MODEL_TYPES",
    "SCRATCH_TRAINING_DEFAULTS",
    "TOKENIZER_MODELS",
    "check_scratch_config",
    "scratch_config",
    "scratch_script_defaults",
    "train_tokenizer",
]

# Model types that can be built from scratch: their special-token layout (pad, eos, unk; decoder start = pad)
# is what `train_tokenizer` produces.
SCRATCH_MODEL_TYPES = ("marian", "t5")
TOKENIZER_MODELS = ("bpe", "unigram")
# Special tokens of a trained tokenizer, in id order: pad=0, eos=1, unk=2, as in T5 (Marian accepts any ids).
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"

# The from-scratch recipe: the settings of `bench/quality_translation.py --preset cpu`, which reached ~24 BLEU
# (greedy) on Multi30k de-en test_2016_flickr in 3 epochs on 2 CPU cores (bench/results/README.md).
# transformers' own defaults (lr 5e-5, batch 8, the opus-mt-sized Marian) suit fine-tuning and learn nothing
# useful from scratch in a CPU budget. Values are the command-line strings a user would type.
SCRATCH_CONFIG_OVERRIDES = {
    # 1.1M parameters with a 3000-token vocabulary (embeddings shared between encoder, decoder and output).
    "marian": "d_model=128,encoder_layers=2,decoder_layers=2,encoder_ffn_dim=256,decoder_ffn_dim=256,"
    "encoder_attention_heads=4,decoder_attention_heads=4,scale_embedding=True,dropout=0.1,"
    "max_position_embeddings=256,share_encoder_decoder_embeddings=True",
    # The same sizes for T5 (not benchmarked).
    "t5": "d_model=128,d_ff=256,num_layers=2,num_decoder_layers=2,num_heads=4,d_kv=32,dropout_rate=0.1",
}
SCRATCH_TRAINING_DEFAULTS = {
    "learning_rate": "1e-3",
    "warmup_steps": "0.1",  # a float in [0, 1) is a fraction of the total steps in transformers 5
    "weight_decay": "1e-4",
    "num_train_epochs": "3",
    "per_device_train_batch_size": "64",
    "per_device_eval_batch_size": "128",
    "logging_steps": "25",  # a loss line every few seconds on a CPU
    # Batches of similar lengths: less padding, 2.6x faster steps on 2 shared cores (0.33 vs 0.87 s).
    "train_sampling_strategy": "group_by_length",
    "max_source_length": "128",  # within the default Marian's 256 positions
    "max_target_length": "128",
}
SCRATCH_TOKENIZER_VOCAB_SIZE = "3000"


def scratch_script_defaults(explicit: set[str], values: dict[str, Any]) -> dict[str, str]:
    """The recipe's flag -> value pairs for a model trained from scratch (--model_type without
    --model_name_or_path), for the flags the user did not set; nothing for a pretrained model."""
    model_type = values.get("model_type")
    if model_type is None or values.get("model_name_or_path") is not None:
        return {}
    defaults = dict(SCRATCH_TRAINING_DEFAULTS)
    if values.get("config_name") is None:
        defaults["config_overrides"] = SCRATCH_CONFIG_OVERRIDES[model_type]
    if values.get("tokenizer_name") is None:
        defaults["train_tokenizer_vocab_size"] = SCRATCH_TOKENIZER_VOCAB_SIZE
    return {key: value for key, value in defaults.items() if key not in explicit}


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


def check_scratch_config(model_type: str, overrides: str | None, lengths: dict[str, int | None]) -> None:
    """Refuse, before any work, --config_overrides that the config rejects and lengths (flag -> value) beyond
    its absolute position embeddings: the config without the tokenizer's ids, which change neither."""
    config = CONFIG_MAPPING[model_type]()
    if overrides:
        apply_config_overrides(config, overrides)
    check_max_positions(config, lengths)


def check_max_positions(config: PretrainedConfig, lengths: dict[str, int | None]) -> None:
    """Only models with absolute position embeddings have a hard length limit (T5's attention is relative)."""
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is None or hasattr(config, "relative_attention_max_distance"):
        return
    for flag, value in lengths.items():
        if value is not None and value > max_positions:
            raise ValueError(
                f"--{flag}={value} exceeds the model's {max_positions} position embeddings; "
                f"lower --{flag} to at most {max_positions}."
            )


def scratch_config(model_type: str, tokenizer: Any, overrides: str | None) -> PretrainedConfig:
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
        apply_config_overrides(config, overrides)
        if model_type == "marian" and "vocab_size" in overrides and "decoder_vocab_size" not in overrides:
            config.decoder_vocab_size = config.vocab_size
    for key in ("vocab_size", "decoder_vocab_size"):
        size = getattr(config, key, None)
        if size is not None and size < vocab_size:
            raise ValueError(
                f"--config_overrides sets {key}={size}, smaller than the tokenizer's {vocab_size} tokens."
            )
    return config

