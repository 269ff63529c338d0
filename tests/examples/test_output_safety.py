"""Nothing deleted that isn't ours (issue 16), through run_translation.py and run_image_classification.py as a user
runs them: --overwrite_output_dir deletes only what labo-hf runs wrote, typed argument files, folders claimed only
when training starts, one run per folder, files never written through symlinks, a BOM-free first line, and the
image script's messages. The decoy folders hold decoy files only. Checkpoints and full disks:
test_checkpoint_safety.py."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _translation_runs import OVERRIDES, args_for, previous_run, tree, write_parallel
from conftest import tiny_vit  # noqa: F401 - conftest sets the offline environment first

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

import run_image_classification  # noqa: E402
import run_translation  # noqa: E402
from labo_hf.hf.run_record import RUN_RECORD_NAME, read_run_outputs  # noqa: E402

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
    (["--config_overrides", SMALL, "--labo_fused_linear"], r"--labo_fused_linear applies to decoder-only causal LMs"),
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

