"""Small helpers shared by the example scripts (``run_translation.py``, ``run_image_classification.py``).

They cover what every LABO training script repeats: failing fast with a useful message when a Hub id
cannot be reached, resolving the checkpoint to resume from, logging the process layout, and ending a
multi-process run cleanly. Nothing here touches the loss (`labo_hf.loss.functional`) or the model card, which the
trainers write (`labo_hf.hf.trainers`); `labo_hf.examples.runtime` builds the scripts' stages on these helpers.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "check_hub_reachable_or_local",
    "check_launch_matches_world_size",
    "hub_load_errors",
    "configure_logging",
    "log_process_summary",
    "resolve_checkpoint",
    "shutdown_distributed",
]


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything absolute, relative-explicit, home-relative or with more than
    # one separator can only be a local path, so a missing one is a typo and not a Hub lookup.
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name.count("/") > 1
        or "\\" in name
    )


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of transformers and datasets
        return os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(name: str, repo_type: str, cache_dir: str | None) -> bool:
    from huggingface_hub import constants

    folder = f"{repo_type}s--" + name.replace("/", "--")
    # Look everywhere a cached copy may live: wrongly reporting "not cached" would block a valid offline run.
    roots = [cache_dir] if cache_dir else []
    roots.append(constants.HF_HUB_CACHE)
    if repo_type == "dataset":
        # `datasets` keeps its own cache of prepared data next to the Hub snapshot cache.
        roots.append(os.environ.get("HF_DATASETS_CACHE", os.path.join(constants.HF_HOME, "datasets")))
    for root in roots:
        if os.path.isdir(os.path.join(root, folder)):
            return True
        if repo_type == "dataset" and os.path.isdir(os.path.join(root, name.replace("/", "___"))):
            return True
    return False


def check_hub_reachable_or_local(
    name: str,
    flag: str,
    local_alternative: str,
    *,
    repo_type: str = "model",
    cache_dir: str | None = None,
) -> None:
    """Fail fast, before any loading, when ``name`` (the value of ``flag``) can be neither read locally nor
    fetched from the Hub.

    Accepts an existing local file or folder, and a Hub id that is either cached or reachable (online mode).
    Raises ``ValueError`` naming ``flag`` when ``name`` is a missing local path, or when the Hub is offline
    (``HF_HUB_OFFLINE=1``) and ``name`` is not in the cache; the message ends with ``local_alternative``, e.g.
    "Train from scratch with --model_type marian or pass a local folder.". ``repo_type`` is "model" or
    "dataset". Online failures happen during loading: wrap the load in `hub_load_errors` for those.
    """
    if os.path.exists(name):
        return
    if _looks_like_local_path(name):
        raise ValueError(f"{flag}={name!r}: no such local file or folder. {local_alternative}")
    if _hub_offline() and not _in_hub_cache(name, repo_type, cache_dir):
        raise ValueError(
            f"{flag}={name!r} is neither a local file or folder nor in the Hugging Face cache, and the Hub is "
            f"offline (HF_HUB_OFFLINE is set). {local_alternative}"
        )


@contextmanager
def hub_load_errors(name: str, flag: str, local_alternative: str) -> Iterator[None]:
    """Context manager turning an ``OSError`` raised while loading ``name`` (the value of ``flag``) into a
    ``ValueError`` that names the flag and the local alternative.

    transformers' ``from_pretrained`` and datasets' ``load_dataset`` report an unreachable or unknown Hub id
    as ``OSError`` (``ConnectionError``, ``FileNotFoundError``, ...); the original error stays chained.
    """
    try:
        yield
    except OSError as err:
        raise ValueError(
            f"{flag}={name!r} could not be loaded from a local path or the Hugging Face Hub ({err}). "
            f"{local_alternative}"
        ) from err


def resolve_checkpoint(training_args: Any, logger: logging.Logger | None = None) -> str | None:
    """Return the checkpoint folder that ``trainer.train(resume_from_checkpoint=...)`` should use, or None.

    ``--resume_from_checkpoint PATH`` wins and must be a complete checkpoint folder (``ValueError`` naming the
    flag, and the missing files, otherwise). Without it, and with ``--do_train``, the newest complete
    ``checkpoint-*`` folder in ``--output_dir`` is resumed from, as the transformers example scripts do
    (logged, since it changes what training does); incomplete ones, left by a run killed while saving, are
    skipped with a warning naming them (`labo_hf.hf.checkpoints`).
    """
    from labo_hf.hf.checkpoints import check_checkpoint_complete, find_last_complete_checkpoint

    if training_args.resume_from_checkpoint is not None:
        if not os.path.isdir(training_args.resume_from_checkpoint):
            raise ValueError(
                f"--resume_from_checkpoint={training_args.resume_from_checkpoint!r} is not a folder. Pass a "
                "checkpoint folder written by a previous run (e.g. OUTPUT_DIR/checkpoint-500)."
            )
        check_checkpoint_complete(training_args.resume_from_checkpoint)
        return training_args.resume_from_checkpoint
    if not training_args.do_train or not os.path.isdir(training_args.output_dir):
        return None
    last_checkpoint = find_last_complete_checkpoint(training_args.output_dir, logger)
    if last_checkpoint is not None and logger is not None:
        logger.info(
            f"Checkpoint detected, resuming training at {last_checkpoint}. To train from scratch instead, "
            "choose another --output_dir, or pass --overwrite_output_dir to delete what labo-hf runs wrote there."
        )
    return last_checkpoint


def log_process_summary(logger: logging.Logger, training_args: Any) -> None:
    """Log, on every process, its rank, the world size, the device and the precision.

    The world size is logged explicitly because it is what changes between plain ``python``, ``torchrun`` and
    ``accelerate launch`` runs of the same command, and tests read it back. At info level: it reports, it does not
    warn (replicas, at ``--log_level_replica warning`` by default, do not print it).
    """
    logger.info(
        f"Process rank: {training_args.process_index}, world size: {training_args.world_size}, "
        f"device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"fp16: {training_args.fp16}, bf16: {training_args.bf16}"
    )


def check_launch_matches_world_size(training_args: Any) -> None:
    """Refuse a multi-process launch that did not become one distributed job.

    Without GPUs, accelerate joins the processes started by torchrun or ``accelerate launch`` into one job
    only when told to use the CPU; otherwise each runs alone, all racing on the same ``--output_dir``.
    """
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_processes > 1 and training_args.world_size != launched_processes:
        raise ValueError(
            f"Launched as {launched_processes} processes (WORLD_SIZE) but set up as {training_args.world_size}: "
            "on a machine without GPUs add --use_cpu to run them as one distributed job."
        )
    if _accelerate_started_one_of_several():
        logging.getLogger(__name__).warning(
            "accelerate launch was asked for several processes but started this one alone (world size 1): on a "
            "machine without GPUs add --multi_gpu (accelerate's multi-process launcher) before the script and "
            "--use_cpu after it, e.g. `accelerate launch --multi_gpu --num_processes 2 SCRIPT ... --use_cpu`."
        )


def _accelerate_started_one_of_several() -> bool:
    """Whether accelerate's single-process launcher ran this process although more were asked for.

    ``accelerate launch --num_processes N`` (N > 1) without a multi-process launcher (no ``--multi_gpu`` on a CPU
    machine) runs the script once, with MASTER_ADDR set for N processes but no WORLD_SIZE (accelerate's
    ``prepare_simple_launcher_cmd_env``); ACCELERATE_MIXED_PRECISION marks a process accelerate started.
    """
    return (
        "ACCELERATE_MIXED_PRECISION" in os.environ
        and "MASTER_ADDR" in os.environ
        and "WORLD_SIZE" not in os.environ
    )


def configure_logging(logger: logging.Logger, training_args: Any) -> None:
    """Stage "logging" of the example scripts: the main process logs at info level, replicas at
    ``--log_level_replica`` (warning by default), for the script's logger, transformers and datasets; then
    each process's rank and world size (`log_process_summary`) and the training arguments."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of log_level is passive (warning); training scripts are expected to report progress.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    log_process_summary(logger, training_args)
    logger.info(_arguments_summary(training_args) + " (all training arguments at --log_level debug)")
    logger.debug(f"Training/evaluation parameters {training_args}")


def _arguments_summary(training_args: Any) -> str:
    """One line with the training arguments a reader checks first."""
    length = (f"max_steps {training_args.max_steps}" if training_args.max_steps > 0
              else f"epochs {training_args.num_train_epochs:g}")
    regularizer = getattr(training_args, "label_regularizer", None)
    return (
        f"Training arguments: output_dir {training_args.output_dir}, {length}, learning_rate "
        f"{training_args.learning_rate:g}, per-device batch {training_args.per_device_train_batch_size}, "
        f"gradient accumulation {training_args.gradient_accumulation_steps}, seed {training_args.seed}"
        + (f", label_regularizer {regularizer}" if regularizer else "")
    )


def shutdown_distributed() -> None:
    """End a torchrun / accelerate launch run cleanly: wait for every process, then destroy the process group.

    Left to interpreter shutdown, a gloo process group can abort a process that has finished all its work
    ("terminate called without an active exception", seen in the two-process CPU tests), which makes the
    launcher report a failed run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
