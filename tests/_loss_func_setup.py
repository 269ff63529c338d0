"""Training runs shared by `test_compute_loss_func.py` and its multi-process worker `_ddp_loss_func_worker.py`.

Each run trains a fresh tiny model (seed 0) for a few plain-SGD steps on `uneven_batch_examples`, either with
`LABOTrainer` / `LABOSeq2SeqTrainer` or with the plain transformers Trainer and ``compute_loss_func=labo_loss_func``,
so the two ways in can be compared parameter for parameter.
"""

from __future__ import annotations

from typing import Any

from conftest import LABEL_REGULARIZATION, TASKS, collate, common_args, loss_kwargs, uneven_batch_examples

KINDS = ("labo_trainer", "labo_trainer_fused", "loss_func", "loss_func_fused")
LEARNING_RATE = 0.5


def batch_collator(model: Any, seq2seq: bool):
    """`collate`, plus decoder inputs for encoder-decoders: with ``compute_loss_func`` the Trainer runs the model
    without labels, so the batch must carry them (as ``DataCollatorForSeq2Seq(model=model)`` does)."""
    if not seq2seq:
        return collate

    def with_decoder_inputs(examples):
        batch = collate(examples)
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return batch

    return with_decoder_inputs


def train(kind: str, task_name: str, output_dir: str, batch_size: int, accumulation: int, max_steps: int,
          regularizer: str = "labo", resume_from_checkpoint: str | None = None, **extra: Any):
    """Train with one of `KINDS` (from `resume_from_checkpoint` if given); returns the trainer."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

    from labo_hf import labo_loss_func
    from labo_hf.hf.arguments import LABOSeq2SeqTrainingArguments, LABOTrainingArguments
    from labo_hf.hf.trainers import LABOSeq2SeqTrainer, LABOTrainer

    task = TASKS[task_name]
    model = task.make_model()
    fused = kind.endswith("_fused")
    arguments = common_args(
        output_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=max_steps, optim="sgd", learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential", logging_steps=1,
        **extra,
    )
    trainer_kwargs: dict[str, Any] = {
        "model": model, "train_dataset": uneven_batch_examples(task_name),
        "data_collator": batch_collator(model, task.seq2seq),
    }
    if kind.startswith("labo_trainer"):
        args_cls = LABOSeq2SeqTrainingArguments if task.seq2seq else LABOTrainingArguments
        trainer_cls = LABOSeq2SeqTrainer if task.seq2seq else LABOTrainer
        args = args_cls(**arguments, **LABEL_REGULARIZATION[regularizer], labo_fused_linear=fused)
    else:
        args_cls = Seq2SeqTrainingArguments if task.seq2seq else TrainingArguments
        trainer_cls = Seq2SeqTrainer if task.seq2seq else Trainer
        args = args_cls(**arguments)
        trainer_kwargs["compute_loss_func"] = labo_loss_func(
            **loss_kwargs(regularizer), shift_labels=task.causal, fused_linear=fused, model=model if fused else None
        )
    trainer = trainer_cls(args=args, **trainer_kwargs)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer
