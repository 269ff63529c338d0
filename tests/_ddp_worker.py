"""Worker for `test_accumulation_and_ddp.py::test_two_processes_match_one_process`.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT_DIR``.
Trains the tiny Marian model for one SGD step on `uneven_batch_examples("marian")`, split over the
processes, twice: 8 examples per process without accumulation, and 4 per process with 2 accumulation
steps; after the first, it evaluates on the same 16 examples in batches of 3 per process, so the final
evaluation batch repeats samples to even out the processes. Process 0 writes each run's parameters
(``<run>.pt``) and ``result.json``: world sizes, the ``num_items_in_batch`` and local kept count every
process saw in each micro-step, the training logs and the evaluation metrics.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402  (sets the offline environment before transformers loads)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _torchrun import worker_main, write_result  # noqa: E402

from labo_hf.hf.arguments import LABOTrainingArguments  # noqa: E402
from labo_hf.hf.trainers import LABOSeq2SeqTrainer, LABOTrainer  # noqa: E402

REGULARIZER = "labo"
RUNS = {"bs8_ga1": (8, 1), "bs4_ga2": (4, 2)}
VIT_EVAL_EXAMPLES = 15


class RecordingTrainer(LABOSeq2SeqTrainer):
    """Records what each training `compute_loss` call receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append({
                "num_items_in_batch": float(num_items_in_batch),
                "local_kept": int((inputs["labels"] != conftest.IGNORE).sum()),
            })
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def evaluate_vit(out_dir: str) -> dict[str, float]:
    """Metrics of the untrained tiny ViT on `VIT_EVAL_EXAMPLES` image examples, 4 per process and batch: 15
    = 8 + 7, so the final batch of process 1 repeats one sample."""
    args = LABOTrainingArguments(**conftest.common_args(out_dir, per_device_eval_batch_size=4),
                                 **conftest.LABEL_REGULARIZATION[REGULARIZER])
    trainer = LABOTrainer(model=conftest.tiny_vit(), args=args, data_collator=conftest.collate)
    return trainer.evaluate(conftest.image_examples(VIT_EVAL_EXAMPLES, seed=5))


def main(out_dir: str) -> None:
    result: dict[str, object] = {}
    for name, (batch_size, accumulation) in RUNS.items():
        trainer = conftest.one_sgd_step(
            "marian", os.path.join(out_dir, name), batch_size, accumulation, trainer_cls=RecordingTrainer,
            per_device_eval_batch_size=3, **conftest.LABEL_REGULARIZATION[REGULARIZER],
        )
        metrics = trainer.evaluate(conftest.uneven_batch_examples("marian")) if name == "bs8_ga1" else None
        if name == "bs8_ga1":
            trainer._save_checkpoint(trainer.model, trial=None)  # the atomic save, with both processes' files
        seen_by_process: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(seen_by_process, trainer.seen)
        if trainer.args.process_index == 0:
            torch.save(conftest.flat_parameters(trainer.model), os.path.join(out_dir, f"{name}.pt"))
            result[name] = {
                "world_size": trainer.args.world_size,
                "dist_world_size": dist.get_world_size(),
                "num_processes": trainer.accelerator.num_processes,
                "seen": seen_by_process,
                "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
                "eval_metrics": metrics,
            }
    result["vit_eval"] = evaluate_vit(os.path.join(out_dir, "vit_eval"))
    write_result(out_dir, result)


if __name__ == "__main__":
    worker_main(main)
