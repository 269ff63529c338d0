"""trl's SFTTrainer with LABO (`LABOSFTTrainer`, and ``compute_loss_func=labo_loss_func(...)``), and LoRA (peft)
through `LABOTrainer`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LABEL_REGULARIZATION, TASKS, collate, common_args, loss_kwargs

from labo_hf import labo_loss_func
from labo_hf.loss.reference import reference_label_regularized_loss

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

CHARS = "abcdefghijklmnopqrstuvwxyz .,"
TEXTS = ["the cat sat.", "a dog ran far, then sat.", "hi.", "we go to the sea, and we swim.", "so it goes.",
         "the end is near.", "cats nap.", "one, two, three, four."]


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def _sft_arguments(tmp_path, name, batch_size, accumulation, max_steps, config_class, **fields):
    return config_class(
        **common_args(str(tmp_path / name), per_device_train_batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, max_steps=max_steps, optim="sgd", learning_rate=0.5,
                      lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0,
                      train_sampling_strategy="sequential", logging_steps=1),
        max_length=64, dataset_text_field="text",
        # SFTConfig defaults to bf16 autocast; exactness is tested in float32 (bf16 rounds each micro-batch's logits).
        bf16=False, **fields,
    )


def _count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def _sft(tmp_path, name, batch_size, accumulation, max_steps=2):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = _sft_arguments(tmp_path, name, batch_size, accumulation, max_steps, SFTConfig)
    model = TASKS["llama"].make_model()
    forwards = _count_forwards(model)
    recorded = []
    loss_fn = labo_loss_func(**loss_kwargs("labo"), shift_labels=True)

    def recording(outputs, labels, num_items_in_batch=None):
        loss = loss_fn(outputs, labels, num_items_in_batch=num_items_in_batch)
        recorded.append((outputs.logits.detach(), labels.clone(), num_items_in_batch, loss.detach()))
        return loss

    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=_char_tokenizer(), compute_loss_func=recording)
    trainer.train()
    trainer.forward_calls = len(forwards)
    return trainer, recorded


def _labo_sft(tmp_path, name, batch_size, accumulation, max_steps=2):
    from datasets import Dataset

    from labo_hf import LABOSFTConfig, LABOSFTTrainer

    config = _sft_arguments(tmp_path, name, batch_size, accumulation, max_steps, LABOSFTConfig,
                            **LABEL_REGULARIZATION["labo"])
    model = TASKS["llama"].make_model()
    forwards = _count_forwards(model)
    recorded = []

    class Recording(LABOSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            recorded.append((outputs.logits.detach(), inputs["labels"].clone(), num_items_in_batch, loss.detach()))
            return (loss, outputs) if return_outputs else loss

    trainer = Recording(model=model, args=config, train_dataset=Dataset.from_dict({"text": TEXTS}),
                        processing_class=_char_tokenizer())
    trainer.train()
    trainer.forward_calls = len(forwards)
    return trainer, recorded


def test_labo_sft_trainer_one_forward_per_micro_batch_exact_under_accumulation(tmp_path):
    full, recorded = _labo_sft(tmp_path, "full", 4, 1)
    # One forward per micro-batch: the deprecated compute_loss_func path runs two (checked below).
    assert full.forward_calls == len(recorded) == 2
    logits, labels, count, loss = recorded[0]
    assert int(count) == int((labels[:, 1:] != -100).sum())
    expected = reference_label_regularized_loss(logits[:, :-1].double(), labels[:, 1:], **loss_kwargs("labo"),
                                                num_items_in_batch=count)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
    # trl's metrics and ours, from the same logits.
    logs = [entry for entry in full.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"entropy", "mean_token_accuracy", "num_tokens", "nll", "target_prob", "smoothing_entropy"} <= set(entry)
        assert entry["loss"] > 0 and 0 <= entry["mean_token_accuracy"] <= 1 and entry["entropy"] > 0

    accumulated, recorded_halves = _labo_sft(tmp_path, "accumulated", 2, 2)
    assert accumulated.forward_calls == len(recorded_halves) == 4
    for a, b in zip(full.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # The same training as the deprecated path, which runs an extra no-grad forward per micro-batch.
    deprecated, _ = _sft(tmp_path, "deprecated", 4, 1)
    assert deprecated.forward_calls == 4
    for a, b in zip(full.model.parameters(), deprecated.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # trl's metrics mean what trl's own (fused LM head) computation means.
    trl_logs = [entry for entry in deprecated.state.log_history if "loss" in entry]
    for ours, theirs in zip(logs, trl_logs, strict=True):
        for key in ("entropy", "mean_token_accuracy", "num_tokens"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key

    full.create_model_card()
    card = (tmp_path / "full" / "README.md").read_text()
    assert "label_regularizer: labo" in card and "- labo" in card and "- sft" in card
    assert card.count("@inproceedings{lu2023labo") == 1  # trl's template cites `_paper`; not again


def test_labo_sft_trainer_fused_linear_trains_the_same_without_the_logit_metrics(tmp_path):
    from datasets import Dataset

    from labo_hf import LABOSFTConfig, LABOSFTTrainer

    trainers = []
    for fused in (False, True):
        config = _sft_arguments(tmp_path, f"fused-{fused}", 4, 1, 2, LABOSFTConfig, labo_fused_linear=fused,
                                **LABEL_REGULARIZATION["labo"])
        trainer = LABOSFTTrainer(model=TASKS["llama"].make_model(), args=config,
                                 train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=_char_tokenizer())
        trainer.train()
        assert trainer.labo_loss_function.last_fused == fused
        trainers.append(trainer)
    for a, b in zip(*(t.model.parameters() for t in trainers), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # Without logits there is no entropy or token accuracy to log; the rest is.
    fused_logs = [entry for entry in trainers[1].state.log_history if "loss" in entry]
    assert all("entropy" not in entry and {"nll", "num_tokens"} <= set(entry) for entry in fused_logs)


def test_labo_sft_trainer_refuses_what_it_does_not_compute(tmp_path):
    from datasets import Dataset

    from labo_hf import LABOSFTConfig, LABOSFTTrainer, labo_loss_func

    data = Dataset.from_dict({"text": TEXTS})
    with pytest.raises(ValueError, match="compute_loss_func cannot be used"):
        LABOSFTTrainer(model=TASKS["llama"].make_model(), args=_sft_arguments(tmp_path, "a", 4, 1, 1, LABOSFTConfig),
                       train_dataset=data, processing_class=_char_tokenizer(), compute_loss_func=labo_loss_func())
    with pytest.raises(ValueError, match="loss_type='dft'"):
        LABOSFTTrainer(model=TASKS["llama"].make_model(),
                       args=_sft_arguments(tmp_path, "b", 4, 1, 1, LABOSFTConfig, loss_type="dft"),
                       train_dataset=data, processing_class=_char_tokenizer())


def test_sft_trainer_trains_with_labo_exactly_under_accumulation(tmp_path):
    full, recorded = _sft(tmp_path, "full", 4, 1)
    # Its loss is our reference on the same batch (the logits and labels it saw, labels shifted).
    logits, labels, count, loss = recorded[0]
    assert int(count) == int((labels[:, 1:] != -100).sum())
    expected = reference_label_regularized_loss(logits[:, :-1].double(), labels[:, 1:], **loss_kwargs("labo"),
                                                num_items_in_batch=count)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
    logs = [entry for entry in full.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["loss"] > 0 for entry in logs)
    # Accumulating two half batches gives the same parameters.
    accumulated, _ = _sft(tmp_path, "accumulated", 2, 2)
    for a, b in zip(full.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(full.model.parameters(), TASKS["llama"].make_model().parameters(),
                                                     strict=True))


def test_lora_through_labo_trainer(tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model

    from labo_hf.hf.arguments import LABOTrainingArguments
    from labo_hf.hf.trainers import LABOTrainer

    task = TASKS["llama"]
    base = task.make_model()
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, init_lora_weights=False))
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = LABOTrainingArguments(**common_args(str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=5,
                                               learning_rate=5e-2, logging_steps=1), label_regularizer="labo")
    trainer = LABOTrainer(model=model, args=args, train_dataset=task.make_examples(40, seed=1), data_collator=collate)
    trainer.train()
    assert all("nll" in entry for entry in trainer.state.log_history if "loss" in entry)

    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name and not torch.equal(p, lora_before[name]), name
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            original = name.replace("base_layer.", "")
            assert torch.equal(p, before[original]), name

    batch = collate(task.make_examples(3, seed=2))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # The base weights were not trained, so the adapter on a fresh base (seed 0) reproduces the model.
    task.make_model().save_pretrained(tmp_path / "base")

    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-6)


def test_lora_fused_linear_matches_full_logits():
    from peft import LoraConfig, get_peft_model

    batch = collate(TASKS["llama"].make_examples(4, seed=5))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    grads = []
    for fused in (False, True):
        model = get_peft_model(TASKS["llama"].make_model(), LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
        model.train()
        loss_fn = labo_loss_func(shift_labels=True, fused_linear=fused, model=model if fused else None)
        loss_fn(model(**inputs), batch["labels"]).backward()
        assert loss_fn.last_fused == fused
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_sft_config_without_bf16_runs_in_float32(tmp_path, caplog):
    """trl defaults to bf16; on a machine without it (this CPU, use_cpu unset) the default becomes float32, said in
    one log line, instead of transformers' "Your setup doesn't support bf16/gpu"."""
    from transformers.utils import is_torch_bf16_gpu_available

    from labo_hf import LABOSFTConfig

    if is_torch_bf16_gpu_available():
        pytest.skip("this machine has bf16")
    with caplog.at_level("WARNING", logger="labo_hf.hf.sft_trainer"):
        config = LABOSFTConfig(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 is False
    assert [r.getMessage() for r in caplog.records if "float32" in r.getMessage()] != []
    with pytest.raises(ValueError, match="bf16"):
        LABOSFTConfig(output_dir=str(tmp_path), report_to="none", bf16=True)  # asked for: transformers refuses
    assert LABOSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True).bf16 is True
