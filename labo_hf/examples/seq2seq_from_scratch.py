"""A sequence-to-sequence model from scratch for ``run_translation.py``: a subword tokenizer trained on the
training text, and a Marian or T5 config wired to its vocabulary and special tokens."""

from __future__ import annotations

from typing import Any

from transformers import CONFIG_MAPPING, PretrainedConfig, PreTrainedTokenizerFast

from labo_hf.examples.cli_args import apply_config_overrides

__all__ = ["SCRATCH_MODEL_TYPES", "TOKENIZER_MODELS", "scratch_config", "train_tokenizer"]

# Model types that can be built from scratch: their special-token layout (pad, eos, unk; decoder start = pad)
# is what `train_tokenizer` produces.
SCRATCH_MODEL_TYPES = ("marian", "t5")
TOKENIZER_MODELS = ("bpe", "unigram")
# Special tokens of a trained tokenizer, in id order: pad=0, eos=1, unk=2, as in T5 (Marian accepts any ids).
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"


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

