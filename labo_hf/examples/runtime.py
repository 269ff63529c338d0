"""The shared base of the example scripts (``run_translation.py``, ``run_image_classification.py``).

Each script keeps its task: data loading, preprocessing, model building and metrics. What they share lives
here, in the order of the stages of the transformers example scripts:

1. arguments: in `labo_hf.examples.cli_args`, re-exported here;
2. the run's start: `start_run` (logging, the launch check, the output folder's guard with the run's
   identity from `run_identity`, the checkpoint to resume from, the seed), and `load_hub_or_local` for every
   Hub id or local path the scripts load;
3. the tail: `train_evaluate_predict` (train, save, evaluate, predict, model card or Hub upload).

Script-side glue: the library (`labo_hf.hf.trainers` and below) never imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

from transformers import set_seed

from labo_hf.examples.cli_args import (
    ExampleDataArguments,
    ExampleModelArguments,
    HelpFormatter,
    argument,
    parse_args,
)
from labo_hf.examples.folder_lock import lock_output_dir, unlock_output_dir
from labo_hf.examples.launch import (
    check_hub_reachable_or_local,
    check_launch_matches_world_size,
    configure_logging,
    hub_load_errors,
    resolve_checkpoint,
)
from labo_hf.examples.output_folder import TOKENIZER_STAGING, claim_output_dir, prepare_output_dir
from labo_hf.hf.run_record import (
    add_run_outputs,
    check_same_run,
    read_run_outputs,
    read_run_record,
    recording_new_entries,
)

__all__ = [
    "ExampleDataArguments",
    "ExampleModelArguments",
    "HelpFormatter",
    "argument",
    "load_hub_or_local",
    "parse_args",
    "run_identity",
    "run_inputs",
    "start_run",
    "train_evaluate_predict",
]

logger = logging.getLogger(__name__)

def load_hub_or_local(
    load: Callable[..., Any], source: str, flag: str, local_hint: str, *, repo_type: str = "model", **kwargs: Any
) -> Any:
    """``load(source, **kwargs)`` (a ``from_pretrained`` or ``load_dataset``) for the value ``source`` of
    ``flag``, failing fast, naming the flag and ``local_hint``, when it is neither local nor on the Hub."""
    check_hub_reachable_or_local(source, flag, local_hint, repo_type=repo_type, cache_dir=kwargs.get("cache_dir"))
    with hub_load_errors(source, flag, local_hint):
        return load(source, **kwargs)


# What identifies a training run besides its label regularization: the fields, of either script, that
# change the model it starts from or the data it trains on (absent fields are skipped).
_MODEL_IDENTITY_FIELDS = ("model_name_or_path", "model_type", "config_name", "config_overrides", "tokenizer_name",
                          "train_tokenizer_vocab_size", "train_tokenizer_model")
_DATA_IDENTITY_FIELDS = ("dataset_name", "dataset_config_name", "train_dir", "train_file", "train_prefix",
                         "max_train_samples", "train_val_split", "source_lang", "target_lang")
_PATH_FIELDS = {"train_dir", "train_file", "train_prefix"}
# Every field, of either script, that names something the run reads: --overwrite_output_dir must not delete it.
_INPUT_FIELDS = ("model_name_or_path", "config_name", "tokenizer_name", "image_processor_name", "dataset_name",
                 "train_dir", "validation_dir", "test_dir", "train_file", "validation_file", "test_file",
                 "train_prefix", "validation_prefix", "test_prefix", "resume_from_checkpoint", "argument_file")


def run_inputs(*arguments: Any) -> dict[str, str]:
    """The local paths the run reads, by flag (``--train_dir`` -> path), from the parsed argument instances;
    a parallel-text prefix counts by its folder, a Hub id (no such local path) not at all."""
    inputs = {}
    for instance in arguments:
        for name in _INPUT_FIELDS:
            value = getattr(instance, name, None)
            if isinstance(value, str) and (os.path.exists(value) or name.endswith("_prefix")):
                inputs[f"--{name}" if name != "argument_file" else "the arguments file"] = value
    return inputs


def _describe(arguments: Any, fields: Sequence[str]) -> str:
    parts = []
    for name in fields:
        value = getattr(arguments, name, None)
        if value is None:
            continue
        if name in _PATH_FIELDS or (isinstance(value, str) and os.path.exists(value)):
            value = os.path.abspath(value)  # the same data named from another working directory
        parts.append(f"{name}={value}")
    return ", ".join(parts)


def run_identity(model_args: Any, data_args: Any, training_args: Any) -> dict[str, Any]:
    """The run's identity (`labo_hf.hf.run_record`): its label regularization, defaults filled in, and, when it
    trains, the model it starts from and its training data. An evaluation-only run changes no model, so only
    the loss its eval_loss uses identifies it."""
    identity: dict[str, Any] = {
        "label_regularizer": training_args.label_regularizer,
        "label_regularizer_alpha": training_args.resolved_label_regularizer_alpha,
        "labo_temperature": training_args.resolved_labo_temperature,
    }
    if training_args.do_train:
        identity["model"] = _describe(model_args, _MODEL_IDENTITY_FIELDS) or "the script's default model"
        identity["data"] = _describe(data_args, _DATA_IDENTITY_FIELDS) or "the script's default data"
    return identity


def start_run(
    script_logger: logging.Logger,
    training_args: Any,
    applied_defaults: dict[str, str] | None = None,
    *,
    model_args: Any,
    data_args: Any,
) -> tuple[str | None, dict[str, Any]]:
    """Logging, the multi-process launch check, the output folder, the checkpoint to resume from, and the seed.

    --output_dir must be new, empty, or hold this same run (`labo_hf.examples.output_folder.prepare_output_dir`;
    --overwrite_output_dir deletes what labo-hf runs wrote there). Returns the checkpoint for ``trainer.train(resume_from_checkpoint=...)``
    (--resume_from_checkpoint, else the newest complete one in --output_dir when training, else None) and the
    run's identity, for the trainer's ``run_identity``.
    """
    configure_logging(script_logger, training_args)
    if applied_defaults:
        script_logger.info(f"Script defaults applied (flags you did not set): {applied_defaults}")
    check_launch_matches_world_size(training_args)
    identity = run_identity(model_args, data_args, training_args)
    # The process that saves for this filesystem locks and empties the folder before the others look at it;
    # the folder is claimed (its run record written) only once training starts (`train_evaluate_predict`).
    with training_args.main_process_first(local=training_args.save_on_each_node, desc="checking --output_dir"):
        created_lock = training_args.should_save and lock_output_dir(training_args.output_dir)
        try:
            prepare_output_dir(training_args.output_dir, identity, overwrite=data_args.overwrite_output_dir,
                               is_main_process=training_args.should_save, logger=script_logger,
                               inputs=run_inputs(model_args, data_args, training_args))  # fmt: skip
        except BaseException:
            if training_args.should_save:  # refused: the folder is left as it was found
                unlock_output_dir(training_args.output_dir, remove_file=created_lock)
            raise
    checkpoint = resolve_checkpoint(training_args, script_logger)
    if checkpoint is not None:
        check_same_run(
            read_run_record(checkpoint), identity, f"--resume_from_checkpoint={checkpoint!r}",
            "Resume from a checkpoint of this run; to start from its weights alone, pass it as --model_name_or_path.",
        )  # fmt: skip
    # Seeded before any model is created, so that a from-scratch initialization is reproducible.
    set_seed(training_args.seed)
    return checkpoint, identity


def _previous_results(output_dir: str, split: str) -> dict[str, float] | None:
    """The metrics an earlier call saved in ``{split}_results.json`` of `output_dir`, if any."""
    path = os.path.join(output_dir, f"{split}_results.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def train_evaluate_predict(
    trainer: Any,
    *,
    checkpoint: str | None,
    predict_dataset: Any = None,
    eval_kwargs: dict[str, Any] | None = None,
    predict_kwargs: dict[str, Any] | None = None,
    predict_metrics: Callable[..., dict[str, float]] | None = None,
    write_predictions: Callable[[Any], None] | None = None,
    model_card: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The stages after the Trainer is built, as ``--do_train``/``--do_eval``/``--do_predict`` ask.

    Writes ``{train,eval,predict,all}_results.json``, the model with its processing class (reloadable with
    the Auto classes), the model card (with ``model_card``'s keywords; the LABO trainers add the regularizer
    and the paper) or the Hub upload under ``--push_to_hub``. ``predict_metrics`` replaces
    ``compute_metrics`` for the test split; ``write_predictions`` receives ``trainer.predict``'s output on the
    main process. Returns all the metrics.
    """
    args = trainer.args
    try:
        metrics = _stages(trainer, checkpoint, predict_dataset, eval_kwargs, predict_kwargs, predict_metrics,
                          write_predictions, model_card)
        if getattr(args, "should_save", False):  # every process loaded the tokenizer shared there long ago
            shutil.rmtree(os.path.join(args.output_dir, TOKENIZER_STAGING), ignore_errors=True)
        return metrics
    finally:
        if getattr(args, "should_save", False):
            unlock_output_dir(args.output_dir)


def _stages(
    trainer: Any, checkpoint: str | None, predict_dataset: Any, eval_kwargs: dict[str, Any] | None,
    predict_kwargs: dict[str, Any] | None, predict_metrics: Callable[..., dict[str, float]] | None,
    write_predictions: Callable[[Any], None] | None, model_card: dict[str, Any] | None,
) -> dict[str, float]:
    args = trainer.args
    all_metrics: dict[str, float] = {}
    if getattr(args, "should_save", False):
        # Every input is loaded: the run now claims the folder (writes its run record).
        claim_output_dir(args.output_dir, trainer.run_identity)

    def report(split: str, metrics: dict[str, float]) -> None:
        trainer.log_metrics(split, metrics)
        trainer.save_metrics(split, metrics)
        all_metrics.update(metrics)

    if args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        train_metrics = {**train_result.metrics, "train_samples": len(trainer.train_dataset)}
        if getattr(trainer, "resumed_complete_run", False):
            # The rerun of a finished run trained nothing: the results of the run are the ones it wrote then,
            # kept in the run record before its final save (which may have been interrupted).
            train_metrics = (_previous_results(args.output_dir, "train")
                             or read_run_outputs(args.output_dir).get("train_metrics") or train_metrics)
        elif args.should_save:
            add_run_outputs(args.output_dir, train_metrics=train_metrics)
        trainer.save_model()  # with the tokenizer or image processor, so the folder reloads with Auto classes
        report("train", train_metrics)
        trainer.save_state()
    if args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(metric_key_prefix="eval", **(eval_kwargs or {}))
        report("eval", {**metrics, "eval_samples": len(trainer.eval_dataset)})
    if args.do_predict:
        logger.info("*** Predict ***")
        if predict_metrics is not None:
            trainer.compute_metrics = predict_metrics
        output = trainer.predict(predict_dataset, metric_key_prefix="predict", **(predict_kwargs or {}))
        report("predict", {**(output.metrics or {}), "predict_samples": len(predict_dataset)})
        if write_predictions is not None and trainer.is_world_process_zero():
            with recording_new_entries(args.output_dir):
                write_predictions(output)

    card = {key: value for key, value in (model_card or {}).items() if value is not None}
    if os.path.exists(str(card.get("dataset_tags", ""))):
        # The card's `datasets:` metadata names Hub datasets; a local folder's path means nothing on the Hub.
        del card["dataset_tags"]
    if args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    return all_metrics
