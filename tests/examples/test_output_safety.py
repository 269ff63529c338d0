"""Nothing deleted that isn't ours, nothing lost (issue 16), through run_translation.py as a user runs it:
--overwrite_output_dir deletes only what labo-hf runs wrote, typed argument files, content-checked
checkpoints, disk-full errors that leave nothing behind, folders claimed only when training starts, one run
per folder, results that survive an interrupted final save, files never written through symlinks, and a
BOM-free first line. The decoy folders hold decoy files only."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit  # noqa: F401 - conftest sets the offline environment first

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

import run_image_classification  # noqa: E402
import run_translation  # noqa: E402
from labo_hf.hf.run_record import RUN_RECORD_NAME, read_run_outputs, write_run_record  # noqa: E402
from labo_hf.hf.safe_files import DiskFullError  # noqa: E402

WORDS = {"eins": "one", "zwei": "two", "rot": "red", "blau": "blue", "Hund": "dog", "Katze": "cat", "Haus": "house",
         "Baum": "tree"}
OVERRIDES = ("d_model=16,encoder_layers=1,decoder_layers=1,encoder_ffn_dim=32,decoder_ffn_dim=32,"
             "encoder_attention_heads=2,decoder_attention_heads=2,dropout=0.0,max_position_embeddings=32")


def write_parallel(prefix: Path, n: int = 32, seed: int = 0, bom: bool = False) -> None:
    rng = random.Random(seed)
    pairs = [[rng.choice(list(WORDS)) for _ in range(rng.randint(3, 5))] for _ in range(n)]
    for lang, lines in (("de", [" ".join(p) for p in pairs]), ("en", [" ".join(WORDS[w] for w in p) for p in pairs])):
        Path(f"{prefix}.{lang}").write_text(("\ufeff" if bom else "") + "".join(line + "\n" for line in lines),
                                            encoding="utf-8")


def args_for(prefix: Path, out: Path, steps: int = 4, **flags: object) -> list[str]:
    args = ["--model_type", "marian", "--config_overrides", OVERRIDES, "--train_tokenizer_vocab_size", 60,
            "--max_source_length", 16, "--max_target_length", 16, "--train_prefix", prefix, "--source_lang", "de", "--target_lang", "en", "--do_train",
            "--per_device_train_batch_size", 8, "--max_steps", steps, "--save_steps", 2, "--output_dir", out,
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", 0, "--logging_steps", 1]
    for flag, value in flags.items():
        args += [f"--{flag}"] if value is True else [f"--{flag}", value]
    return [str(arg) for arg in args]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    write_parallel(folder / "train")
    return folder / "train"


def previous_run(out: Path, entries: list[str]) -> None:
    """A folder as an earlier labo-hf run left it: a run record listing `entries`, which exist."""
    out.mkdir(parents=True, exist_ok=True)
    for name in entries:
        (out / name).mkdir(exist_ok=True)
        (out / name / "weights.bin").write_bytes(b"w")
    write_run_record(str(out), {"label_regularizer": "labo"}, {"entries": entries})


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1, 2: --overwrite_output_dir deletes only what labo-hf runs wrote ----

@pytest.mark.parametrize("flag", ["train_prefix", "model_name_or_path", "resume_from_checkpoint"])
def test_overwrite_refuses_when_an_input_lies_inside_the_folder(tmp_path, flag):
    out = tmp_path / "out"
    previous_run(out, ["data", "checkpoint-4", "checkpoint-6"])
    write_parallel(out / "data" / "train")
    before = tree(out)
    args = args_for(out / "data" / "train", out, overwrite_output_dir=True)
    if flag == "model_name_or_path":  # fine-tune the earlier run's checkpoint, data from elsewhere
        write_parallel(tmp_path / "train")
        args = [a for a in args if a not in ("--model_type", "marian", "--config_overrides", OVERRIDES,
                                             "--train_tokenizer_vocab_size", "60", "--max_source_length",
                                             "--max_target_length", "16")]
        args[args.index(str(out / "data" / "train"))] = str(tmp_path / "train")
        args += ["--model_name_or_path", str(out / "checkpoint-6")]
    if flag == "resume_from_checkpoint":
        args += ["--resume_from_checkpoint", str(out / "checkpoint-4")]
    with pytest.raises(ValueError, match=r"would delete inputs of this very run.*Nothing was deleted"):
        run_translation.main(args)
    assert tree(out) == before


def _decoy_home(root: Path) -> Path:
    (root / ".ssh").mkdir(parents=True)
    (root / ".ssh" / "id_rsa").write_text("DECOY KEY")
    (root / "Documents").mkdir()
    (root / "Documents" / "thesis.txt").write_text("four years")
    (root / ".bashrc").write_text("alias ll='ls -l'")
    return root


@pytest.mark.parametrize("how", ["direct", "symlink", "source_tree", "recorded_run_plus_a_foreign_file"])
def test_overwrite_never_deletes_files_no_run_wrote(tmp_path, data, how):
    home = _decoy_home(tmp_path / "home")
    out = home
    if how == "symlink":
        out = tmp_path / "link"
        out.symlink_to(home, target_is_directory=True)
    elif how == "source_tree":
        repo = tmp_path / "repo"
        (repo / ".git").mkdir(parents=True)
        (repo / "src").mkdir()
        (repo / "src" / "model.py").write_text("import torch\n")
        home, out = repo, repo / "src"
    elif how == "recorded_run_plus_a_foreign_file":
        home = out = tmp_path / "run"
        previous_run(out, ["checkpoint-2"])
        (out / "notes.txt").write_text("mine")
    before = tree(home)
    with pytest.raises(ValueError, match=r"that no labo-hf run recorded writing \(.*(\.bashrc|model\.py|notes\.txt)"):
        run_translation.main(args_for(data, out, overwrite_output_dir=True))
    assert tree(home) == before


def test_overwrite_deletes_the_recorded_entries_and_unlinks_symlinks(tmp_path, data):
    import shutil

    out = tmp_path / "out"
    previous_run(out, ["checkpoint-2", "link"])
    decoy = _decoy_home(tmp_path / "home")
    (out / "checkpoint-2" / "link-inside").symlink_to(decoy, target_is_directory=True)
    shutil.rmtree(out / "link")
    (out / "link").symlink_to(decoy, target_is_directory=True)
    before = tree(decoy)
    run_translation.main(args_for(data, out, steps=2, overwrite_output_dir=True))
    assert tree(decoy) == before  # links removed, their targets untouched
    assert not (out / "link").exists() and not (out / "checkpoint-2" / "link-inside").exists()
    entries = set(read_run_outputs(str(out))["entries"])
    assert {"checkpoint-2", "model.safetensors", "train_results.json", "README.md"} <= entries
    assert "link" not in entries


def test_overwrite_on_a_read_only_mount_is_a_clear_error_and_deletes_nothing(tmp_path, data, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    out = tmp_path / "out"
    previous_run(out, ["checkpoint-2"])
    before = tree(out)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"is not writable \(Read-only file system\)"):
        run_translation.main(args_for(data, out, overwrite_output_dir=True))
    assert tree(out) == before


# ---- 3: argument files typed like the command line ----

@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_argument_file_values_are_type_checked(tmp_path, data, suffix):
    out = tmp_path / "out"
    previous_run(out, ["checkpoint-2"])
    before = tree(out)
    arguments = {"model_type": "marian", "train_prefix": str(data), "source_lang": "de", "target_lang": "en",
                 "do_train": True, "output_dir": str(out), "overwrite_output_dir": "false", "use_cpu": True}
    path = tmp_path / f"args{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(arguments))
    else:
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in arguments.items()))
    with pytest.raises(ValueError, match=rf"args\{suffix}: 'overwrite_output_dir' is 'false' \(str\), but "
                                         r"--overwrite_output_dir takes a bool \(true or false"):
        run_translation.main([str(path)])
    assert tree(out) == before


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


# ---- 6: a folder is claimed only when training starts ----

@pytest.mark.parametrize("mistake", ["config_overrides", "train_prefix", "refused_flag"])
def test_a_run_failing_before_training_does_not_claim_the_folder(tmp_path, data, mistake):
    out = tmp_path / "out"
    wrong = {"config_overrides": {"config_overrides": OVERRIDES + ",d_modell=8"},
             "train_prefix": {"train_prefix": tmp_path / "nowhere" / "train"},
             "refused_flag": {"label_smoothing_factor": 0.1}}[mistake]
    with pytest.raises(ValueError):
        run_translation.main(args_for(data, out, steps=2, **wrong))
    assert not (out / RUN_RECORD_NAME).exists()
    run_translation.main(args_for(data, out, steps=2))  # the corrected command
    assert (out / "model.safetensors").exists()


# ---- 7: one run per folder at a time ----

def test_a_second_run_in_the_same_folder_is_refused_naming_the_first(tmp_path, data):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(REPO_ROOT)!r})
            from labo_hf.examples.folder_lock import lock_output_dir
            lock_output_dir({str(out)!r})
            print("locked", flush=True)
            time.sleep(300)
        """)], stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another run: process {holder.pid} on "):
            run_translation.main(args_for(data, out, steps=2))
    finally:
        holder.kill()
        holder.wait()
    run_translation.main(args_for(data, out, steps=2))  # the lock of a dead process does not block
    assert (out / "model.safetensors").exists()


# ---- 9, 11: no write through a planted symlink; a BOM is not text ----

def test_no_write_through_a_symlink_and_no_bom_in_the_vocabulary(tmp_path):
    (tmp_path / "data").mkdir()
    write_parallel(tmp_path / "data" / "train", bom=True)
    out = tmp_path / "out"
    args = args_for(tmp_path / "data" / "train", out, steps=2)
    run_translation.main(args)
    outside = tmp_path / "precious.txt"
    outside.write_text("precious")
    (out / (RUN_RECORD_NAME + ".partial")).symlink_to(outside)
    run_translation.main(args)  # the same command again: its run record is rewritten
    assert outside.read_text() == "precious"
    assert not (out / RUN_RECORD_NAME).is_symlink()
    vocabulary = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert not any("\ufeff" in token for token in vocabulary)


# ---- 11: clear messages of the image script ----

IMAGE_VIT = ["--model_type", "vit", "--per_device_train_batch_size", "4", "--report_to", "none", "--do_train",
             "--max_steps", "1", "--use_cpu"]
SMALL = "image_size=8,patch_size=4,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32"


@pytest.mark.parametrize("extra, message", [
    (["--config_overrides", "image_size=8,patch_sise=4"], r"--config_overrides='image_size=8,patch_sise=4': key patch_sise"),
    (["--config_overrides", SMALL, "--labo_fused_linear"], r"--labo_fused_linear\) is for causal LMs"),
    (["--config_overrides", SMALL, "--gradient_accumulation_steps", "0"],
     r"--gradient_accumulation_steps must be at least 1, got 0"),
])
def test_image_script_names_the_flag(tmp_path, extra, message):
    from PIL import Image

    for name, color in (("blue", (30, 60, 220)), ("red", (220, 40, 40))):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), color).save(tmp_path / "train" / name / f"{i}.png")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_image_classification.main([*IMAGE_VIT, "--train_dir", str(tmp_path / "train"), "--output_dir", str(out),
                                       *extra])
    assert not (out / RUN_RECORD_NAME).exists()


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
