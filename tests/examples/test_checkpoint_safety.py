"""Nothing lost (issue 16), through run_translation.py: content-checked checkpoints (a damaged newest one is named
and skipped, never with torch's weights_only=False advice), full disks said as such and leaving nothing behind,
and training results that survive an interrupted final save."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from _translation_runs import args_for, write_parallel
from conftest import tiny_vit  # noqa: F401 - conftest sets the offline environment first

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

import run_translation  # noqa: E402
from labo_hf.hf.run_record import RUN_RECORD_NAME, read_run_outputs  # noqa: E402
from labo_hf.hf.safe_files import DiskFullError  # noqa: E402

# ---- 4: content-checked checkpoints ----

def _zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 0x01  # inside the last tensor's data, past the header
    path.write_bytes(bytes(data))


# Each keeps the file's size, which is all the manifest recorded before.
CORRUPTIONS = {
    "garbage_trainer_state": ("trainer_state.json", lambda p: p.write_bytes(b"#" * p.stat().st_size)),
    "zeroed_optimizer": ("optimizer.pt", _zero),
    "zeroed_rng_state": ("rng_state.pth", _zero),
    "weights_0xff": ("model.safetensors", lambda p: p.write_bytes(b"\xff" * p.stat().st_size)),
    "weights_bit_flip": ("model.safetensors", _flip_a_bit),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finished")
    (root / "data").mkdir()
    write_parallel(root / "data" / "train")
    run_translation.main(args_for(root / "data" / "train", root / "out"))
    return root / "data" / "train", root / "out"


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to, symlinks=True)
    return to


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_newest_checkpoint_is_named_and_skipped(finished_run, tmp_path, caplog, corruption):
    data, run = finished_run
    out = _copy(run, tmp_path / "out")
    name, damage = CORRUPTIONS[corruption]
    damage(out / "checkpoint-4" / name)
    with caplog.at_level("WARNING"):
        run_translation.main(args_for(data, out))  # the same command again
    assert f"checkpoint-4 (missing or damaged: {name} (content differs from what was saved)" in caplog.text
    assert "Resuming from checkpoint-2 instead" in caplog.text
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # The reference: the undamaged run. Resuming from checkpoint-2 trains steps 3-4 again, identically.
    from safetensors.torch import load_file

    resumed, reference = load_file(out / "model.safetensors"), load_file(run / "model.safetensors")
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


def test_damaged_checkpoint_named_when_resumed_explicitly_without_unsafe_advice(finished_run, tmp_path):
    data, run = finished_run
    out = _copy(run, tmp_path / "out")
    _zero(out / "checkpoint-4" / "optimizer.pt")
    with pytest.raises(ValueError) as error:
        run_translation.main(args_for(data, out, resume_from_checkpoint=out / "checkpoint-4"))
    message = str(error.value)
    assert "checkpoint-4/optimizer.pt (content differs from what was saved)" in message
    assert "weights_only" not in message


def test_plain_checkpoint_without_manifest_that_fails_to_load_is_named(finished_run, tmp_path, caplog):
    data, run = finished_run
    out = _copy(run, tmp_path / "out")
    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # as plain transformers saves them
        (out / checkpoint / "labo_checkpoint_manifest.json").unlink()
    _zero(out / "checkpoint-4" / "rng_state.pth")
    with caplog.at_level("WARNING"):
        run_translation.main(args_for(data, out))
    assert "checkpoint-4 (missing or damaged: rng_state.pth (unreadable" in caplog.text
    assert "weights_only" not in caplog.text
    with pytest.raises(ValueError, match=r"checkpoint-4/rng_state.pth \(unreadable") as error:
        _zero(out / "checkpoint-4" / "rng_state.pth")
        (out / "checkpoint-4" / "labo_checkpoint_manifest.json").unlink()
        run_translation.main(args_for(data, out, resume_from_checkpoint=out / "checkpoint-4"))
    assert "weights_only" not in str(error.value)


# ---- 5, 8: a full disk is said, leaves nothing behind, and loses no result ----

def _fail_writes_to(monkeypatch, suffix: str, error: BaseException) -> None:
    """Make os.fdopen'd files (labo-hf's own writes) whose path ends with `suffix` fail with `error`."""
    real = os.fdopen

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise error

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        return Failing(f) if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix) else f

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to find a descriptor's path")
def test_full_disk_while_writing_the_run_record(tmp_path, data, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _fail_writes_to(patch, RUN_RECORD_NAME + ".partial", OSError(errno.ENOSPC, "No space left on device"))
        with pytest.raises(DiskFullError, match=rf"No space left on device while writing {RUN_RECORD_NAME}.partial "
                                                rf"\(.*out/{RUN_RECORD_NAME}.partial\)"):
            run_translation.main(args_for(data, out, steps=2))
    assert not (out / (RUN_RECORD_NAME + ".partial")).exists()
    run_translation.main(args_for(data, out, steps=2))  # space freed: the same command runs
    assert (out / "model.safetensors").exists()


def test_full_disk_during_a_checkpoint_save(tmp_path, data, monkeypatch):
    import shutil
    from collections import namedtuple

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0; "
                               "basic_ios::clear: iostream error")
        return real_save(obj, f, *args, **kwargs)

    usage = namedtuple("usage", "total used free")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        patch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 0))
        with pytest.raises(DiskFullError, match=r"No space left on device while writing checkpoint checkpoint-4"):
            run_translation.main(args_for(data, out))
    assert sorted(name for name in os.listdir(out) if "checkpoint" in name) == ["checkpoint-2"]  # no staging left
    run_translation.main(args_for(data, out))  # space freed: resumes from checkpoint-2
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_interrupted_final_save_keeps_the_training_results(tmp_path, data, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file
    final = str(tmp_path / "out" / "model.safetensors")

    def full_disk(tensors, filename, *args, **kwargs):
        if str(filename) == final:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(modeling_utils, "safe_save_file", full_disk)
        with pytest.raises(DiskFullError, match=r"No space left on device while writing the run's outputs"):
            run_translation.main(args_for(data, out))
    assert not (out / "model.safetensors").exists()  # the partial file went
    first = read_run_outputs(str(out))["train_metrics"]
    results = run_translation.main(args_for(data, out))  # space freed: the same command
    assert results["train_loss"] == pytest.approx(first["train_loss"]) and results["train_loss"] > 0
    assert results["train_runtime"] == pytest.approx(first["train_runtime"]) and results["train_runtime"] > 0.01
    assert json.loads((out / "train_results.json").read_text())["train_loss"] == pytest.approx(first["train_loss"])


def test_a_checkpoint_torch_refuses_to_unpickle_is_named_without_unsafe_advice(finished_run, tmp_path):
    from fractions import Fraction

    data, run = finished_run
    out = _copy(run, tmp_path / "out")
    (out / "checkpoint-4" / "labo_checkpoint_manifest.json").unlink()  # as plain transformers saves it
    # A well-formed torch file (its zip CRCs pass) holding an object torch's safe loader refuses.
    torch.save({"state": Fraction(1, 2)}, out / "checkpoint-4" / "optimizer.pt")
    with pytest.raises(ValueError, match=r"checkpoint-4' could not be loaded \(it holds objects that torch does not "
                                         r"load safely\)") as error:
        run_translation.main(args_for(data, out, resume_from_checkpoint=out / "checkpoint-4"))
    assert "weights_only" not in str(error.value) and error.value.__cause__ is None
