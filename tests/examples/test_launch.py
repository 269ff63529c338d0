"""The example scripts' logging (`labo_hf.examples.launch.configure_logging`): quiet by default."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def restore_transformers_verbosity():
    import transformers

    level = transformers.utils.logging.get_verbosity()
    yield
    transformers.utils.logging.set_verbosity(level)


def test_logging_reports_without_warning_or_dumping_arguments(tmp_path, caplog, restore_transformers_verbosity):
    """The rank line is information, not a warning; the ~120-line arguments dump is at debug, one summary line at
    info."""
    from transformers import TrainingArguments

    from labo_hf.examples.launch import configure_logging

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=3)
    logger = logging.getLogger("labo_test_quiet")
    with caplog.at_level(logging.DEBUG, logger="labo_test_quiet"):
        configure_logging(logger, args)
    records = [r for r in caplog.records if r.name == "labo_test_quiet"]
    rank = [r for r in records if r.getMessage().startswith("Process rank: 0, world size: 1")]
    assert [r.levelno for r in rank] == [logging.INFO]
    summary = [r for r in records if r.getMessage().startswith("Training arguments:")]
    assert len(summary) == 1 and "max_steps 3" in summary[0].getMessage()
    assert summary[0].getMessage().count("\n") == 0
    assert all(r.levelno <= logging.DEBUG for r in records if "Training/evaluation parameters" in r.getMessage())
    assert all(r.levelno < logging.WARNING for r in records)
