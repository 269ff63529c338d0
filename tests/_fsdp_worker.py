"""Worker for `tests/hf/test_fsdp2.py`: FSDP2 (``fully_shard``) on CPU with gloo, every case in one launch.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_fsdp_worker.py OUT_DIR``.
A 2-layer Llama (hidden 64, vocab 1000) takes 3 SGD steps on 8 counting sequences, the first 4 short and the
last 4 long, so the two processes' halves keep very different numbers of label positions. Each case (a way of
sharding, a way of computing the loss) runs sharded over the 2 processes, each on its half, and once unsharded
on the whole batch in every process (the reference, without collectives). Process 0 writes ``result.json``:
per case, the largest loss and final-parameter differences to the reference, relative to the reference's
largest magnitude, or the ValueError the case raised.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402  (sets the offline environment before transformers loads)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _torchrun import worker_main, write_result  # noqa: E402

from labo_hf import FusedLinearLABOLoss, LABOLoss, apply_labo, labo_loss_func  # noqa: E402

STEPS = 3
LEARNING_RATE = 0.5
LOSS = {"regularizer": "labo", "alpha": 0.2, "temperature": 1.5}
SHARDINGS = ("root", "own_unit", "root_resharded", "accelerate", "tied")
KINDS = ("logits", "fused_module", "loss_func_fused", "loss_func_fused_expect", "apply_labo", "apply_labo_fused")


def make_model(tied: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config).train()


def batch() -> dict[str, torch.Tensor]:
    short = conftest.counting_examples(4, seed=21, min_len=2, max_len=3)
    long = conftest.counting_examples(4, seed=22, min_len=9, max_len=12)
    return conftest.collate(short + long)


def shard(model: torch.nn.Module, sharding: str, mp_policy=None) -> None:
    from torch.distributed.fsdp import fully_shard

    extra = {} if mp_policy is None else {"mp_policy": mp_policy}
    if sharding == "own_unit":
        fully_shard(model.lm_head, **extra)
    for layer in model.model.layers:
        fully_shard(layer, **extra)
    if sharding == "accelerate":  # what accelerate's FSDP2 plugin builds (fsdp2_prepare_model, accelerate 1.x)
        fully_shard(model.model.embed_tokens, **extra)
        fully_shard([model.model.norm, model.lm_head], reshard_after_forward=False, **extra)
    fully_shard(model, reshard_after_forward=sharding == "root_resharded", **extra)


class Step:
    """One way of computing a micro-batch's loss, divided by `count` (the global kept count)."""

    def __init__(self, kind: str, model: torch.nn.Module) -> None:
        self.kind, self.model = kind, model
        self.loss_func = labo_loss_func(**LOSS, shift_labels=True, fused_linear=True, model=model) \
            if kind.startswith("loss_func_fused") else None
        if kind.startswith("apply_labo"):
            apply_labo(model, **LOSS, fused_linear=kind.endswith("_fused"))
        self.hidden = None
        if kind == "fused_module":
            model.model.register_forward_hook(lambda module, args, output: setattr(self, "hidden", output[0]))

    def loss(self, part: dict[str, torch.Tensor], count: int) -> torch.Tensor:
        inputs = {"input_ids": part["input_ids"], "attention_mask": part["attention_mask"]}
        labels = part["labels"]
        if self.kind.startswith("apply_labo"):
            return self.model(**inputs, labels=labels, num_items_in_batch=count).loss
        if self.kind.startswith("loss_func_fused"):
            if self.kind.endswith("_expect"):  # the loss then runs inside the forward
                self.loss_func.expect(labels, num_items_in_batch=count)
            return self.loss_func(self.model(**inputs), labels, num_items_in_batch=count)
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=conftest.IGNORE)
        if self.kind == "logits":
            return LABOLoss(**LOSS)(self.model(**inputs).logits, shifted, num_items_in_batch=count)
        self.model(**inputs, logits_to_keep=1)
        hidden = self.hidden.reshape(-1, self.hidden.shape[-1])
        return FusedLinearLABOLoss(**LOSS)(hidden, self.model.lm_head.weight, shifted.reshape(-1),
                                           num_items_in_batch=count)


def full_parameters(model: torch.nn.Module) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().reshape(-1).double()
                      for p in model.parameters()])


def train(kind: str, sharding: str | None, mp_policy=None, tied: bool = False) -> tuple[list[float], torch.Tensor]:
    """Losses (summed over processes) and final parameters of 3 SGD steps; unsharded when `sharding` is None."""
    model = make_model(tied=tied or sharding == "tied")
    step = Step(kind, model)  # before fully_shard: apply_labo needs the transformers model's own class
    full = batch()
    count = int((full["labels"][:, 1:] != conftest.IGNORE).sum())
    if sharding is None:
        part, world = full, 1
    else:
        shard(model, sharding, mp_policy)
        rank, world = dist.get_rank(), dist.get_world_size()
        part = {key: value.chunk(world)[rank] for key, value in full.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        # Each process's loss is its sum over the global count; FSDP averages the gradients over processes.
        loss = step.loss(part, count)
        (loss * world).backward()
        optimizer.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total))
    return losses, full_parameters(model)


def compare(kind: str, sharding: str, reference: tuple[list[float], torch.Tensor], mp_policy=None) -> dict:
    try:
        losses, parameters = train(kind, sharding, mp_policy)
    except Exception as error:  # noqa: BLE001  (each case reports its own failure to the test)
        return {"error": f"{type(error).__name__}: {error}"}
    ref_losses, ref_parameters = reference
    ref_update = ref_parameters - full_parameters(make_model(tied=sharding == "tied"))
    return {
        "loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)),
        "parameters": float((parameters - ref_parameters).abs().max() / ref_parameters.abs().max()),
        "update": float((parameters - ref_parameters).abs().max() / ref_update.abs().max()),
    }


def fsdp_asked_warnings(out_dir: str) -> list[str]:
    """The warnings of a `LABOTrainer` built with ``fsdp="full_shard"`` (on CPU, accelerate runs DDP)."""
    import warnings

    from labo_hf.hf.arguments import LABOTrainingArguments
    from labo_hf.hf.trainers import LABOTrainer

    args = LABOTrainingArguments(**conftest.common_args(os.path.join(out_dir, "fsdp_asked")), fsdp="full_shard")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LABOTrainer(model=make_model(), args=args, data_collator=conftest.collate)
    return [str(warning.message) for warning in caught if "FSDP" in str(warning.message)]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    result: dict[str, object] = {"world_size": dist.get_world_size()}
    references = {(kind, tied): train(kind, None, tied=tied) for kind in KINDS for tied in (False, True)}
    for sharding in SHARDINGS:
        for kind in KINDS:
            result[f"{sharding}/{kind}"] = compare(kind, sharding, references[kind, sharding == "tied"])
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for kind in ("logits", "apply_labo_fused"):
        result[f"bf16/{kind}"] = compare(kind, "own_unit", references[kind, False], mp_policy=bf16)
    result["fsdp_asked_warnings"] = fsdp_asked_warnings(out_dir)
    write_result(out_dir, result)


if __name__ == "__main__":
    worker_main(main)
