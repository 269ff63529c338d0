"""Worker for `test_checkpoints.py`: trains the tiny ViT with a checkpoint every 2 steps, optionally killing
itself with SIGKILL in the middle of one checkpoint save.

Run as ``python tests/_crash_worker.py OUT_DIR MAX_STEPS [KILL_AT_STEP]``. With KILL_AT_STEP the process
dies while the checkpoint of that step is being written (weights on disk, optimizer and trainer state not
yet), as a preempted or out-of-memory-killed job does. Without it, training resumes from the newest complete
checkpoint of OUT_DIR, if any (``resume_from_checkpoint=True``, the same call for a first run and a rerun
once a checkpoint exists).
"""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402  (sets the offline environment before transformers loads)
from transformers import Trainer  # noqa: E402

from labo_hf.hf.arguments import LABOTrainingArguments  # noqa: E402
from labo_hf.hf.trainers import LABOTrainer  # noqa: E402


def train(out_dir: str, max_steps: int, kill_at_step: int | None = None) -> LABOTrainer:
    args = LABOTrainingArguments(**conftest.common_args(
        out_dir, per_device_train_batch_size=4, max_steps=max_steps, learning_rate=1e-2, save_strategy="steps",
        save_steps=2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
    ))
    trainer = LABOTrainer(model=conftest.tiny_vit(), args=args, train_dataset=conftest.image_examples(16),
                          data_collator=conftest.collate)
    if kill_at_step is not None:
        save_optimizer = Trainer._save_optimizer_and_scheduler

        def save_then_die(self, output_dir):
            if self.state.global_step == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            save_optimizer(self, output_dir)

        trainer._save_optimizer_and_scheduler = save_then_die.__get__(trainer)
    # As the example scripts do: resume when the folder holds checkpoints.
    resume = os.path.isdir(out_dir) and any(name.startswith("checkpoint-") for name in os.listdir(out_dir))
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    kill = int(sys.argv[3]) if len(sys.argv) > 3 else None
    train(sys.argv[1], int(sys.argv[2]), kill)
