"""The accelerate config files for multi-GPU runs (docs/accelerate/*.yaml) are what `accelerate launch` reads.

They are for GPUs, so no test launches them; each goes through the steps of ``accelerate launch --config_file``
up to the environment it hands the training processes, and accelerate's plugin is built from that environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "docs" / "accelerate"


def _launch_args(name: str):
    """The arguments `accelerate launch --config_file docs/accelerate/<name> train.py` runs with."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(CONFIGS / name))  # refuses unknown top-level keys
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    assert not set(nested) - known, f"keys accelerate launch does not know: {sorted(set(nested) - known)}"
    args, defaults, mixed_precision_from_config = _validate_launch_command(
        parser.parse_args(["--config_file", str(CONFIGS / name), "train.py"]))
    return args, defaults, mixed_precision_from_config


def test_fsdp2_config_gives_fsdp2_resharding_each_decoder_layer():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _launch_args("fsdp2.yaml")
    assert args.use_fsdp and args.mixed_precision == "bf16" and args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


def test_zero3_config_gives_deepspeed_zero3():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'labo-hf[deepspeed]')")
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, mixed_precision_from_config = _launch_args("zero3.yaml")
    assert args.use_deepspeed and args.mixed_precision == "bf16" and args.num_processes == 8
    # What `accelerate launch` adds before handing over to the DeepSpeed launcher.
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 3 and plugin.zero3_init_flag
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 3
