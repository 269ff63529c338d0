"""Worker for `tests/hf/test_deepspeed.py`: DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo), many cases in one launch.

Run as ``DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 2
tests/_deepspeed_worker.py OUT_DIR [STAGE ...]``. For each ZeRO stage, the `_loss_func_setup` runs (`LABOTrainer`
from the logits and fused, plain `Trainer` + `labo_loss_func` plain and fused), plain `Trainer` on a model given
`apply_labo` (plain and fused) and `LABOSeq2SeqTrainer` on the tiny Marian take 2 SGD steps of 2 examples per
process and 2 accumulation steps; then `LABOTrainer --labo_fused_linear` runs 4 steps saving at step 2, and a new
trainer resumes from that checkpoint to step 4. Process 0 writes each run's final parameters (gathered under
ZeRO-3) as ``<stage>-<case>.pt`` and ``result.json`` (the world size and each case's error, if any).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402  (sets the offline environment before transformers loads)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _loss_func_setup import KINDS, LEARNING_RATE, train  # noqa: E402
from _torchrun import worker_main, write_result  # noqa: E402

BATCH, ACCUMULATION, STEPS = 2, 2, 2


def deepspeed_config(stage: int) -> dict:
    """ZeRO `stage` on CPU; "auto" fields are filled in from the training arguments by transformers."""
    return {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD
    }


def gathered_parameters(model: torch.nn.Module) -> torch.Tensor:
    """`conftest.flat_parameters` of the whole model; collective under ZeRO-3 (every process calls it)."""
    import deepspeed

    parameters = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(parameters):
        return conftest.flat_parameters(model)


def apply_labo_run(kind: str, output_dir: str, stage: int):
    """Plain `Trainer` on the tiny Llama with `apply_labo` (fused for ``apply_labo_fused``)."""
    from transformers import Trainer, TrainingArguments

    from labo_hf import apply_labo

    model = conftest.tiny_llama()
    apply_labo(model, **conftest.loss_kwargs("labo"), fused_linear=kind.endswith("_fused"))
    args = TrainingArguments(**conftest.common_args(
        output_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS, optim="sgd", learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential", logging_steps=1,
        deepspeed=deepspeed_config(stage),
    ))
    trainer = Trainer(model=model, args=args, train_dataset=conftest.uneven_batch_examples("llama"),
                      data_collator=conftest.collate)
    trainer.train()
    return trainer


def run_case(case: str, output_dir: str, stage: int):
    config = {"deepspeed": deepspeed_config(stage)}
    if case in KINDS:
        return train(case, "llama", output_dir, BATCH, ACCUMULATION, STEPS, **config)
    if case.startswith("apply_labo"):
        return apply_labo_run(case, output_dir, stage)
    if case == "seq2seq":
        return train("labo_trainer", "marian", output_dir, BATCH, ACCUMULATION, STEPS, **config)
    # "uninterrupted": 4 steps saving at step 2 (into the folder "resumed" then uses); "resumed": a new trainer
    # from that checkpoint-2 to step 4.
    save = {"save_strategy": "steps", "save_steps": 2}
    first = os.path.join(os.path.dirname(output_dir), f"zero{stage}-uninterrupted")
    if case == "uninterrupted":
        return train("labo_trainer_fused", "llama", first, BATCH, ACCUMULATION, 4, **config, **save)
    return train("labo_trainer_fused", "llama", output_dir, BATCH, ACCUMULATION, 4, **config, **save,
                 resume_from_checkpoint=os.path.join(first, "checkpoint-2"))


CASES = (*KINDS, "apply_labo", "apply_labo_fused", "seq2seq", "uninterrupted", "resumed")


def main(out_dir: str) -> None:
    stages = [int(stage) for stage in sys.argv[2:]] or [2, 3]
    result: dict[str, object] = {"world_size": int(os.environ["WORLD_SIZE"])}
    for stage in stages:
        for case in CASES:
            name = f"zero{stage}-{case}"
            start = time.perf_counter()
            try:
                trainer = run_case(case, os.path.join(out_dir, name), stage)
                parameters = gathered_parameters(trainer.model)
                handle = getattr(trainer.model, "_labo_handle", None)  # set by apply_labo
                loss_fn = getattr(trainer, "_labo_loss_fn", None) or trainer.compute_loss_func or handle.loss_fn
                fused = getattr(loss_fn, "last_fused", None)
                result[name] = {"num_processes": trainer.accelerator.num_processes, "fused": fused,
                                "deepspeed": trainer.is_deepspeed_enabled,
                                "seconds": round(time.perf_counter() - start, 1)}
                if dist.get_rank() == 0:
                    torch.save(parameters, os.path.join(out_dir, f"{name}.pt"))
            except Exception as error:  # noqa: BLE001  (each case reports its own failure to the test)
                result[name] = {"error": f"{type(error).__name__}: {error}"[:3000]}
    write_result(out_dir, result)


if __name__ == "__main__":
    worker_main(main)
