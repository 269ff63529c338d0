"""Refusals the example scripts make before any work: flag combinations that their trainer or model would
refuse only once the data, tokenizer and model are loaded, after files were written to --output_dir."""

from __future__ import annotations

import os
from typing import Any

from labo_hf.examples.launch import check_hub_reachable_or_local

__all__ = ["check_sources", "check_trainer_flags", "one_thread_for_small_model"]


def check_trainer_flags(training_args: Any, model_kind: str) -> None:
    """The LABO trainer flags a script's models can never use; ``model_kind`` names them for the message."""
    if getattr(training_args, "labo_fused_linear", False):
        # The fused-linear loss replaces a decoder-only causal LM's lm_head logits (`labo_hf.hf.lm_head`); the
        # trainer would refuse any other model once it is built.
        raise ValueError(
            f"--labo_fused_linear applies to decoder-only causal LMs only; this script trains {model_kind}. "
            "Leave --labo_fused_linear unset."
        )
    label_names = training_args.label_names
    if label_names is not None and list(label_names) != ["labels"]:
        raise ValueError(
            f"--label_names {' '.join(label_names)}: the LABO trainers read the class labels under the single key "
            "'labels', which this script produces. Leave --label_names unset."
        )


def check_sources(model_args: Any, model_flags: tuple[str, ...], model_hint: str, dataset_name: str | None,
                  data_hint: str) -> None:  # fmt: skip
    """Every Hub id or local path the run will load (``model_flags`` of ``model_args``, and --dataset_name) is
    local, cached or reachable; each refusal names its flag and ends with the script's local alternative."""
    for flag in model_flags:
        if getattr(model_args, flag) is not None:
            check_hub_reachable_or_local(getattr(model_args, flag), f"--{flag}", model_hint,
                                         cache_dir=model_args.cache_dir)  # fmt: skip
    if dataset_name is not None:
        check_hub_reachable_or_local(dataset_name, "--dataset_name", data_hint, repo_type="dataset",
                                     cache_dir=model_args.cache_dir)  # fmt: skip


def one_thread_for_small_model(logger: Any, device_type: str, model: str) -> None:
    """A script's small default ``model`` on CPU runs with one intra-op thread unless OMP_NUM_THREADS is set: its
    matrices are too small to gain from more, and on 2 shared cores 2 threads made steps 2-10x slower in our
    measurements (every op waiting for a descheduled thread). An explicit OMP_NUM_THREADS is left to torch."""
    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)
        logger.info(f"{model} on CPU: using 1 intra-op thread (set OMP_NUM_THREADS to choose another number)")
