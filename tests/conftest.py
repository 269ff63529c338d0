"""Shared test setup: offline Hugging Face, tiny models built from configs, toy learnable tasks.

Everything here is importable as a plain module too (`tests/_ddp_worker.py` does), so it holds no
pytest-only logic besides the fixtures at the end. transformers is imported inside the factories only:
test files that never build a model (the loss tests) do not pay for importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach the Hub: models are built from configs, datasets are generated in memory.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The machine is shared: one thread per test process avoids oversubscribing the cores (tiny models gain
# nothing from intra-op parallelism anyway).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # Scripts' and benchmarks' main() may set torch's global thread count; later tests must not inherit it.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

# Real data sets (Multi30k, CIFAR-10 zips) for the tests that need them: $LABO_DATA_DIR, else ../shared/data
# next to the repository; the tests that need a missing one are skipped.
DATA_DIR = Path(os.environ.get("LABO_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")))

VOCAB = 48
PAD, EOS = 0, 1
FIRST_TOKEN = 2
# The toy tasks use only tokens in [FIRST_TOKEN, FIRST_TOKEN + TOY_TOKENS): a model first learns to put its
# mass there, so the loss falls within a few steps even before it learns the task itself.
TOY_TOKENS = 10
NUM_IMAGE_CLASSES = 4
IMAGE_SIZE = 8
IGNORE = -100


def tiny_marian(seed: int = 0) -> Any:
    """Marian encoder-decoder, d_model 16, one layer each side, no dropout."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=VOCAB, decoder_vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, share_encoder_decoder_embeddings=True,
    )
    return MarianMTModel(config)


def tiny_t5(seed: int = 0) -> Any:
    """T5 encoder-decoder, d_model 16, one layer each side, no dropout."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    return T5ForConditionalGeneration(config)


def tiny_vit(seed: int = 0) -> Any:
    """ViT on 8x8 images with 4x4 patches, hidden 16, one layer, 4 classes, no dropout."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=NUM_IMAGE_CLASSES,
    )
    return ViTForImageClassification(config)


def tiny_gpt2(seed: int = 0) -> Any:
    """GPT-2 causal LM, n_embd 16, one layer, no dropout (a causal LM without `loss_type`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0) -> Any:
    """Llama causal LM, hidden 16, one layer (a causal LM with `loss_type="ForCausalLM"`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return LlamaForCausalLM(config)


# ---- toy tasks ----


def copy_examples(n: int, seed: int = 0, min_len: int = 2, max_len: int = 8) -> list[dict[str, list[int]]]:
    """Seq2seq copy task: the target is the source; lengths vary so batches need padding."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        tokens = torch.randint(FIRST_TOKEN, FIRST_TOKEN + TOY_TOKENS, (length,), generator=g).tolist() + [EOS]
        examples.append({"input_ids": tokens, "labels": list(tokens)})
    return examples


def counting_examples(n: int, seed: int = 0, min_len: int = 3, max_len: int = 10) -> list[dict[str, list[int]]]:
    """Causal-LM task where each token is the previous one plus one (mod the toy range): learnable fast."""
    g = torch.Generator().manual_seed(seed)
    span = TOY_TOKENS
    examples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        start = int(torch.randint(0, span, (1,), generator=g))
        tokens = [FIRST_TOKEN + (start + i) % span for i in range(length)]
        examples.append({"input_ids": tokens, "labels": list(tokens)})
    return examples


def image_examples(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Image classification: each class has a fixed random pattern, examples add small noise."""
    g = torch.Generator().manual_seed(1234)
    patterns = torch.randn(NUM_IMAGE_CLASSES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    g.manual_seed(seed)
    examples = []
    for _ in range(n):
        label = int(torch.randint(0, NUM_IMAGE_CLASSES, (1,), generator=g))
        pixels = patterns[label] + 0.3 * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        examples.append({"pixel_values": pixels, "labels": label})
    return examples


def uneven_batch_examples(task_name: str) -> list[dict[str, Any]]:
    """16 examples whose first and second halves keep very different numbers of label positions.

    With a sequential sampler, micro-batches of 8 (or the two processes' shards) then have different kept
    counts, so averaging per-micro-batch means would give a different step than the global token mean.
    """
    if task_name == "vit":
        examples = image_examples(16, seed=11)
        for i in (0, 8, 9, 10, 11, 12, 13):  # 1 ignored image in the first half, 6 in the second
            examples[i]["labels"] = IGNORE
        return examples
    short = copy_examples(8, seed=12, min_len=1, max_len=2)
    long = copy_examples(8, seed=13, min_len=8, max_len=10)
    return short + long


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad token sequences (inputs with PAD and attention_mask 0, labels with -100); stack images."""
    batch: dict[str, torch.Tensor] = {}
    if "pixel_values" in examples[0]:
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples])
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
        return batch
    width = max(len(e["input_ids"]) for e in examples)
    label_width = max(len(e["labels"]) for e in examples)
    batch["input_ids"] = torch.tensor([e["input_ids"] + [PAD] * (width - len(e["input_ids"])) for e in examples])
    batch["attention_mask"] = torch.tensor(
        [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
    )
    batch["labels"] = torch.tensor([e["labels"] + [IGNORE] * (label_width - len(e["labels"])) for e in examples])
    return batch


@dataclass(frozen=True)
class ToyTask:
    """A tiny model factory with a matching toy task and the Auto class that reloads the model."""

    name: str
    make_model: Any
    make_examples: Any
    auto_class_name: str
    seq2seq: bool
    causal: bool

    @property
    def auto_class(self) -> Any:
        """The transformers Auto class that reloads a saved model of this task."""
        import transformers

        return getattr(transformers, self.auto_class_name)


TASKS = {
    "marian": ToyTask("marian", tiny_marian, copy_examples, "AutoModelForSeq2SeqLM", seq2seq=True, causal=False),
    "t5": ToyTask("t5", tiny_t5, copy_examples, "AutoModelForSeq2SeqLM", seq2seq=True, causal=False),
    "vit": ToyTask("vit", tiny_vit, image_examples, "AutoModelForImageClassification", seq2seq=False, causal=False),
    "gpt2": ToyTask("gpt2", tiny_gpt2, counting_examples, "AutoModelForCausalLM", seq2seq=False, causal=True),
    "llama": ToyTask("llama", tiny_llama, counting_examples, "AutoModelForCausalLM", seq2seq=False, causal=True),
}


def common_args(output_dir: str, **overrides: Any) -> dict[str, Any]:
    """Training-argument keywords that keep test runs fast, quiet, deterministic and on CPU."""
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "data_seed": 0,
    }
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(params=list(TASKS))
def task(request: pytest.FixtureRequest) -> ToyTask:
    """Each toy task in turn."""
    return TASKS[request.param]


# ---- one optimizer step, for the gradient-accumulation and multi-process tests ----

LEARNING_RATE = 1.0


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """All trainable parameters (tied ones once) as one detached float64 vector."""
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters() if p.requires_grad])


def one_sgd_step(task_name: str, output_dir: str, per_device_batch_size: int, accumulation_steps: int,
                 trainer_cls: Any = None, **extra_args: Any):
    """Train a fresh tiny model (seed 0) for exactly one plain-SGD step on `uneven_batch_examples`.

    Sequential sampling, constant learning rate, no clipping and no weight decay make the step a pure
    function of the accumulated gradient. `extra_args` go to the training arguments (e.g. the label
    regularization fields). Returns the trainer.
    """
    from labo_hf.hf.arguments import LABOSeq2SeqTrainingArguments, LABOTrainingArguments
    from labo_hf.hf.trainers import LABOSeq2SeqTrainer, LABOTrainer

    task = TASKS[task_name]
    args_cls = LABOSeq2SeqTrainingArguments if task.seq2seq else LABOTrainingArguments
    if trainer_cls is None:
        trainer_cls = LABOSeq2SeqTrainer if task.seq2seq else LABOTrainer
    args = args_cls(
        **common_args(
            output_dir, per_device_train_batch_size=per_device_batch_size,
            gradient_accumulation_steps=accumulation_steps, max_steps=1, optim="sgd",
            learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
            weight_decay=0.0, train_sampling_strategy="sequential", logging_steps=1,
        ),
        **extra_args,
    )
    trainer = trainer_cls(
        model=task.make_model(), args=args, train_dataset=uneven_batch_examples(task_name), data_collator=collate
    )
    trainer.train()
    return trainer


# Non-default hyperparameters, so the tests see them reach the loss.
LABEL_REGULARIZATION = {
    "labo": {"label_regularizer": "labo", "label_regularizer_alpha": 0.2, "labo_temperature": 1.5},
    "label_smoothing": {"label_regularizer": "label_smoothing", "label_regularizer_alpha": 0.2},
    "cross_entropy": {"label_regularizer": "cross_entropy"},
}


def loss_kwargs(regularizer: str) -> dict[str, Any]:
    """`label_regularized_loss` keywords matching `LABEL_REGULARIZATION[regularizer]`."""
    fields = LABEL_REGULARIZATION[regularizer]
    return {
        "regularizer": regularizer,
        "alpha": fields.get("label_regularizer_alpha"),
        "temperature": fields.get("labo_temperature"),
    }


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A small parallel training corpus (train.de, train.en) in its own folder; its prefix (tests/examples)."""
    from _translation_runs import write_parallel

    folder = tmp_path / "data"
    folder.mkdir()
    write_parallel(folder / "train")
    return folder / "train"
