"""`RunGuardMixin`: one run per output folder, atomic checkpoints, and resuming only what this run wrote.

The trainers write the run's identity (`labo_hf.hf.run_record`) into every folder they save, resume only
from complete checkpoints of the same run, write checkpoints atomically (`labo_hf.hf.checkpoints`), and train
nothing when the resumed checkpoint already ends the run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from labo_hf.hf._compat import (
    checkpoint_needs_weight_conversion,
    loop_start_training_nothing,
    reload_weights_with_conversion,
)
from labo_hf.hf.checkpoints import (
    STAGING_PREFIX,
    check_checkpoint_complete,
    find_last_complete_checkpoint,
    hash_in_background,
    publish_checkpoint,
    unloadable_checkpoint_error,
)
from labo_hf.hf.run_record import (
    add_run_outputs,
    check_same_run,
    read_run_record,
    recording_new_entries,
    write_run_record,
)
from labo_hf.hf.safe_files import raise_if_disk_full

logger = logging.get_logger(__name__)

__all__ = ["RunGuardMixin"]


@contextmanager
def _named_load_errors(folder: str | None) -> Iterator[None]:
    # A checkpoint without content hashes (plain transformers) can still fail inside torch.load; say which one,
    # without torch's advice to load it unsafely.
    try:
        yield
    except (ValueError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - any failure to read the files
        if folder is None:
            raise
        raise unloadable_checkpoint_error(folder, err) from None

_TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME


class RunGuardMixin:
    """Run identity, atomic checkpoints and safe resuming for a `transformers.Trainer` subclass.

    Must precede the Trainer class (and `LABOLossMixin`) in the bases. ``run_identity`` (constructor keyword):
    entries that identify the run besides the label regularization (e.g. model and data); it is recorded in
    every saved folder and compared when resuming.
    """

    def __init__(self, *args: Any, run_identity: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._labo_run_identity = self._labo_build_run_identity(run_identity)
        self._labo_staging_root: str | None = None  # set while a checkpoint is being written
        self._labo_results_started = False
        self._labo_resumed_complete = False  # `train` resumed from the final checkpoint of a finished run
        self._labo_hasher: Any = None  # the thread adding content hashes to the newest checkpoint's manifest

    @property
    def resumed_complete_run(self) -> bool:
        """Whether the latest `train` call resumed from the final checkpoint of a finished run, and so trained no
        step."""
        return self._labo_resumed_complete

    @property
    def run_identity(self) -> dict[str, Any]:
        """What identifies this training run (see `labo_hf.run_record`): the label regularization, defaults
        filled in, plus the ``run_identity`` entries given to the constructor (e.g. model and data)."""
        return dict(self._labo_run_identity)

    def _labo_build_run_identity(self, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        regularizer, alpha, temperature = self._label_regularization
        identity = {"label_regularizer": regularizer, "label_regularizer_alpha": alpha, "labo_temperature": temperature}
        for key, value in (extra or {}).items():
            if key in identity and identity[key] != value:
                raise ValueError(
                    f"run_identity[{key!r}]={value!r} contradicts the trainer's arguments ({identity[key]!r})."
                )
            identity[key] = value
        return identity

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, resuming only from a complete checkpoint of the same run.

        ``resume_from_checkpoint=True`` takes the newest complete ``checkpoint-N`` of ``output_dir`` (incomplete
        ones are skipped with a warning); an explicit folder that is incomplete, or that records another
        label regularization (or model or data, when both sides record them), is a ``ValueError``.
        """
        self.check_label_regularization_unchanged()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = find_last_complete_checkpoint(self.args.output_dir, logger)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint not in (None, False):
            folder = os.fspath(resume_from_checkpoint)
            check_checkpoint_complete(folder)
            check_same_run(
                read_run_record(folder), self.run_identity, f"Checkpoint {folder!r}",
                "Resume from a checkpoint of this run, or start a new run; to start from its weights alone, "
                "load them as the model (e.g. --model_name_or_path CHECKPOINT).",
            )
        self._labo_resumed_complete = False
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._labo_wait_for_hashes()
        if self._labo_resumed_complete:
            # No step ran in this call, so it has no training loss; the finished run's own is in its first results.
            output.metrics.pop("train_loss", None)
            output = output._replace(training_loss=math.nan)
        return output

    def _init_training_state(
        self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
        resume_from_checkpoint: str | None, trial: Any,
    ) -> tuple[int, int]:
        """`Trainer._init_training_state`, training nothing when the resumed checkpoint ends this very run.

        transformers would train one step past ``max_steps`` there (`labo_hf._compat`). A checkpoint past the end of
        a run of another length is a ``ValueError``: resuming cannot undo steps.
        """
        saved_max_steps = None
        if resume_from_checkpoint is not None:
            state_path = os.path.join(resume_from_checkpoint, _TRAINER_STATE_NAME)
            if os.path.isfile(state_path):
                with open(state_path, encoding="utf-8") as f:
                    saved_max_steps = json.load(f).get("max_steps")
        start = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        step = self.state.global_step
        if resume_from_checkpoint is None or step < max_steps:
            return start
        if saved_max_steps and saved_max_steps != max_steps:
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint!r} is at step {step} of a run of {saved_max_steps} steps, past "
                f"the end of this run of {max_steps} steps (max_steps={self.args.max_steps}, num_train_epochs="
                f"{self.args.num_train_epochs}); resuming cannot undo steps. Resume with the length of the run "
                f"that wrote it, resume from an earlier checkpoint, or start a new run in another output_dir."
            )
        logger.warning(
            f"Checkpoint {resume_from_checkpoint!r} is the end of this run (step {step} of {max_steps}): the run is "
            "already complete, so no step is trained and the model is the checkpoint's. No train_loss is reported "
            "for this call. To train further, raise max_steps or num_train_epochs."
        )
        self._labo_resumed_complete = True
        return loop_start_training_nothing(num_train_epochs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus the run record (``labo_run.json``) naming how the model was trained."""
        self.check_label_regularization_unchanged()
        folder = output_dir if output_dir is not None else self.args.output_dir
        # The final save into the output folder: its new entries are the run's (a failed save removes them).
        with recording_new_entries(folder, self.args.should_save and not _internal_call):
            super().save_model(output_dir, _internal_call=_internal_call)
            if self.args.should_save:
                write_run_record(folder, self.run_identity)

    def save_state(self) -> None:
        with recording_new_entries(self.args.output_dir, self.args.should_save):
            super().save_state()

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        with recording_new_entries(self.args.output_dir, self.is_world_process_zero()):
            super().create_model_card(*args, **kwargs)

    def save_metrics(self, split: str, metrics: dict[str, float], combined: bool = True) -> None:
        """`Trainer.save_metrics`, where ``all_results.json`` combines this trainer's results only.

        transformers merges into whatever ``all_results.json`` the folder already holds; results of an
        earlier run (another model, another regularizer) would then pass for this one's.
        """
        if combined and not self._labo_results_started and self.is_world_process_zero():
            stale = os.path.join(self.args.output_dir, "all_results.json")
            if os.path.exists(stale):
                logger.info(f"Replacing {stale} from an earlier run (its results are not merged into this run's).")
                os.remove(stale)
        if combined:
            self._labo_results_started = True
        with recording_new_entries(self.args.output_dir, self.is_world_process_zero()):
            super().save_metrics(split, metrics, combined=combined)

    # ---- atomic checkpoints ----
    # These overrides rely on how transformers 5.25.0's `Trainer._save_checkpoint` works (see
    # https://github.com/huggingface/transformers/blob/v5.25.0/src/transformers/trainer.py): it takes its run
    # folder from `_get_output_dir(trial)`, writes everything under ``run_dir/checkpoint-N``, then rotates and
    # pushes. tests/hf/test_checkpoints.py fails if that changes.

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being written, transformers' `_save_checkpoint` writes into the staging folder.
        if self._labo_staging_root is not None:
            return self._labo_staging_root
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The upload runs in the background; started from the staging folder it would race with the rename.
        if self._labo_staging_root is None:
            super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """`Trainer._save_checkpoint`, atomic: the checkpoint appears complete or not at all.

        Every process writes into ``RUN_DIR/.tmp-checkpoint-N/checkpoint-N``; after a barrier, the process
        that saves for each filesystem adds a manifest and renames the folder to ``RUN_DIR/checkpoint-N``
        (`labo_hf.checkpoints`). Rotation and Hub pushes then see the final folder only.
        """
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        self._labo_wait_for_hashes()
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # left by a save that was interrupted
        self.accelerator.wait_for_everyone()
        self._labo_staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as err:
            # Nothing partial stays behind: the rerun resumes from the previous checkpoint.
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            raise_if_disk_full(err, staged, f"checkpoint {name}")
            raise
        finally:
            self._labo_staging_root = None
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                # The saved state must name the folder that will exist, not the staging one.
                self.state.save_to_json(os.path.join(staged, _TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            try:
                publish_checkpoint(staged, final, hash_now=False)
            except BaseException:
                if os.path.isdir(staged):  # not published: the previous checkpoints stay the newest
                    shutil.rmtree(staging_root, ignore_errors=True)
                raise
            shutil.rmtree(staging_root, ignore_errors=True)
            add_run_outputs(run_dir, [name])
            self._labo_hasher = hash_in_background(final)
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)

    # ---- checkpoint reloading (transformers workarounds: labo_hf._compat) ----

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # `model` is only passed for DeepSpeed/FSDP/SageMaker, left to transformers.
        with _named_load_errors(resume_from_checkpoint):
            if model is None and self._labo_needs_weight_conversion(resume_from_checkpoint):
                logger.info(f"Loading model weights from {resume_from_checkpoint} (with weight-name conversion).")
                reload_weights_with_conversion(self.model, resume_from_checkpoint)
                return
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        with _named_load_errors(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        with _named_load_errors(checkpoint):
            super()._load_rng_state(checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and self._labo_needs_weight_conversion(best):
            logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
            reload_weights_with_conversion(self.model, best)
            return
        super()._load_best_model()

    def _labo_wait_for_hashes(self) -> None:
        if self._labo_hasher is not None:
            self._labo_hasher.join()
            self._labo_hasher = None

    def _labo_needs_weight_conversion(self, folder: str) -> bool:
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(self.model, "peft_config"))
        return plain and checkpoint_needs_weight_conversion(self.model, folder)


    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._labo_resumed_complete and "train_loss" in logs:
            # The summary of a call that trained no step: transformers would report train_loss 0.0.
            del logs["train_loss"]
        super().log(logs, start_time)
