"""Executed documentation: every Python block of README.md, and every shell command line of README.md and of both
scripts' ``--help``, run in a smoke form (tiny models, two steps, local toy data; Hub names mapped to tiny local
models), so that a documented command that no longer works fails here.

The README and the ``--help`` texts are parsed at run time. Smoke form of a command line: its flags as written,
then overrides that make it small (``--max_steps 2``, a tiny ``--config_overrides``, a few samples); Hub models
and data sets are replaced by local ones (`HUB_MODELS`, `HUB_DATASETS`: a new Hub name in the docs needs an
entry); ``--push_to_hub`` is dropped (no network). Launch lines (torchrun, accelerate launch) must be the ones
of `labo_hf.examples.launch_lines`; the CPU accelerate line is run with two processes. Set-up lines
(venv, pip install) are checked against pyproject.toml, the test-suite line is not run (it is this suite), and
benchmark lines are parsed by the benchmark's own argument parser (their runs are tests/bench's smoke tests).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TASKS, collate

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The documents whose commands and Python blocks are executed: the README and the usage guide it links.
DOCS = {"README.md": README, "docs/usage.md": ROOT / "docs" / "usage.md"}
SCRIPTS = ("run_translation.py", "run_image_classification.py")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TINY_MARIAN = (
    "d_model=32,encoder_layers=1,decoder_layers=1,encoder_ffn_dim=64,decoder_ffn_dim=64,encoder_attention_heads=2,"
    "decoder_attention_heads=2,max_position_embeddings=64"
)
TINY_VIT = "image_size=8,patch_size=4,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32"
COMMON_SMOKE = ["--max_steps", "2", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1",
                "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8"]
SMOKE = {
    "run_translation.py": [*COMMON_SMOKE, "--max_train_samples", "32", "--max_source_length", "32",
                           "--max_target_length", "32", "--generation_max_length", "8", "--generation_num_beams", "1"],
    "run_image_classification.py": list(COMMON_SMOKE),
}
# Only for the splits a command uses (the scripts refuse a limit on a split they do not use).
SAMPLE_LIMITS = {"--do_eval": ["--max_eval_samples", "8"], "--do_predict": ["--max_predict_samples", "8"]}
# Hub names in the docs -> the local stand-in (built by the `hub` fixture).
HUB_MODELS = {
    "Helsinki-NLP/opus-mt-de-en": "marian", "google-t5/t5-small": "marian",
    "google/vit-base-patch16-224-in21k": "vit", "Qwen/Qwen2.5-0.5B": "llama",
}
HUB_DATASETS = {
    "bentrevett/multi30k": "translation", "wmt/wmt16": "translation", "uoft-cs/cifar10": "images", "beans": "images",
    "trl-lib/Capybara": "text",
}
WORDS = ["eins", "zwei", "drei", "Hund", "Katze", "Haus", "rot", "blau", "und", "sieht"]


# ---- reading the docs ----

def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _command_lines(text: str, indent: str = "") -> list[str]:
    """Shell command lines (continuations joined, comments dropped) of a text whose commands start with
    `indent` followed by python, torchrun or accelerate."""
    commands, current = [], None
    for raw in text.splitlines():
        line = raw[len(indent):] if raw.startswith(indent) else None
        if current is not None and line is not None:
            current += " " + line.strip()
        elif line is not None and re.match(r"(python3? |torchrun |accelerate launch |[A-Z_]+=\S+ )", line):
            current = line.strip()
        if current is not None and not current.endswith("\\"):
            commands.append(re.sub(r"\s+#\s.*$", "", current).strip())
            current = None
        elif current is not None:
            current = current[:-1].rstrip()
    return commands


def doc_commands(doc: str) -> list[str]:
    return [line for block in _blocks(DOCS[doc].read_text(), "bash") for line in _command_lines(block)]


def readme_commands() -> list[str]:
    return doc_commands("README.md")


def help_text(script: str, capsys) -> str:
    module = __import__(script[:-3])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    return capsys.readouterr().out


def help_commands(script: str, capsys) -> list[str]:
    text = help_text(script, capsys)
    # The free text ends where argparse's first group of flags begins.
    end = re.search(r"\n(options|the script's flags[^\n]*):\n", text)
    return _command_lines(text[: end.start()], indent="    ")


# ---- local stand-ins ----

def _write_images(root: Path, per_class: int) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for name, color in {"blue": (30, 60, 220), "red": (220, 40, 40)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = torch.randint(-20, 20, (8, 8, 3), generator=generator)
            pixels = (torch.tensor(color) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def _translation_data(folder: Path) -> None:
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True)
    for split, n in (("train", 48), ("val", 8), ("test_2016_flickr", 8), ("test", 8)):
        pairs = [[rng.choice(WORDS) for _ in range(4)] for _ in range(n)]
        for lang, lines in (("de", [" ".join(p) for p in pairs]), ("en", [" ".join(p).upper() for p in pairs])):
            (folder / f"{split}.{lang}").write_text("".join(line + "\n" for line in lines))
        with open(folder / f"{split}.jsonl", "w") as f:
            for p in pairs:
                f.write(json.dumps({"translation": {"de": " ".join(p), "en": " ".join(p).upper()}}) + "\n")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Tiny local models and data for the Hub names of the docs."""
    import shutil

    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    import run_translation

    root = tmp_path_factory.mktemp("hub")
    _translation_data(root / "multi30k")
    for split in ("train", "test"):
        _write_images(root / "images" / split, 6)
        shutil.make_archive(str(root / "images" / split), "zip", root / "images" / split)
    run_translation.main([
        "--model_type", "marian", "--config_overrides", TINY_MARIAN, "--train_tokenizer_vocab_size", "60",
        "--train_prefix", root / "multi30k" / "train", "--source_lang", "de", "--target_lang", "en",
        "--do_train", "--max_steps", "1", "--output_dir", root / "marian", "--report_to", "none",
        "--save_strategy", "no", "--max_source_length", "32", "--max_target_length", "32",
    ])
    sizes = {key: int(value) for key, value in (pair.split("=") for pair in TINY_VIT.split(","))}
    vit = ViTModel(ViTConfig(**sizes), add_pooling_layer=False)
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(root / "vit")
    _save_tiny_llama(root / "llama")
    return root


def _save_tiny_llama(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz .,"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                 pad_token_id=0, eos_token_id=1, bos_token_id=1)).save_pretrained(folder)


# ---- smoke forms ----

def _value_after(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _localize(script: str, args: list[str], hub: Path) -> list[str]:
    """The arguments with Hub names and documented paths replaced by local stand-ins."""
    out, i = [], 0
    while i < len(args):
        flag, value = args[i], args[i + 1] if i + 1 < len(args) else None
        i += 1
        if flag in ("--push_to_hub", "--dataset_config_name"):
            i += flag == "--dataset_config_name"  # a flag with a value
        elif flag == "--model_name_or_path":
            assert value in HUB_MODELS or Path(value).exists(), f"map {value} to a local model in HUB_MODELS"
            out += [flag, str(hub / HUB_MODELS[value]) if value in HUB_MODELS else value]
            i += 1
        elif flag == "--dataset_name":
            assert value in HUB_DATASETS, f"map the data set {value} to local data in HUB_DATASETS"
            if script == "run_translation.py":
                for split, name, used in (("train", "train", "--do_train"), ("validation", "val", "--do_eval"),
                                          ("test", "test", "--do_predict")):
                    out += [f"--{split}_file", str(hub / "multi30k" / f"{name}.jsonl")] if used in args else []
            else:
                out += ["--train_dir", str(hub / "images/train"), "--validation_dir", str(hub / "images/test")]
            i += 1
        else:
            out.append(_local_path(flag, hub))
    return out


def _local_path(token: str, hub: Path) -> str:
    for prefix in ("../shared/data/multi30k/", "/path/to/multi30k/"):
        if token.startswith(prefix):
            return str(hub / "multi30k" / token[len(prefix):])
    for prefix in ("../shared/data/cifar10/", "/path/to/cifar10/"):
        if token.startswith(prefix):
            return str(hub / "images" / token[len(prefix):])
    if token in ("train.jsonl", "val.jsonl"):
        return str(hub / "multi30k" / token)
    return token


def smoke_args(script: str, args: list[str], hub: Path, cwd: Path) -> list[str]:
    """A documented command's arguments in smoke form."""
    args = _localize(script, args, hub)
    if args and args[0].endswith((".json", ".yaml")):
        arguments = {"model_type": "marian", "config_overrides": TINY_MARIAN, "train_tokenizer_vocab_size": 60,
                     "train_prefix": str(hub / "multi30k/train"), "source_lang": "de", "target_lang": "en",
                     "do_train": True, "output_dir": "outputs/from-file", "max_steps": 2, "report_to": "none",
                     "max_source_length": 32, "max_target_length": 32}
        (cwd / args[0]).write_text(json.dumps(arguments))
        return args
    smoke = list(SMOKE[script])
    for flag, limit in SAMPLE_LIMITS.items():
        smoke += limit if flag in args else []
    model_type = _value_after(args, "--model_type")
    if model_type == "marian":
        smoke += ["--config_overrides", TINY_MARIAN]
    elif model_type == "vit":
        smoke += ["--config_overrides", TINY_VIT]
    if "--train_tokenizer_vocab_size" in args:
        smoke += ["--train_tokenizer_vocab_size", "60"]
    resume = _value_after(args, "--resume_from_checkpoint")
    if resume is not None and not (cwd / resume).exists():
        # The documented step number is the full run's; the smoke run's last checkpoint stands in for it.
        found = sorted((cwd / resume).parent.glob("checkpoint-*"))
        assert found, f"{resume}: the command before it made no checkpoint"
        args[args.index(resume)] = str(found[-1])
    return args + smoke


def run_script(script: str, argv: list[str], cwd: Path, monkeypatch) -> None:
    monkeypatch.chdir(cwd)
    __import__(script[:-3]).main(argv)


# ---- the tests ----

def test_launch_lines_have_one_source(capsys):
    """README and both --help texts show the launch lines of `labo_hf.examples.launch_lines`, and no other
    (e.g. no ``accelerate launch --num_processes 2`` for CPU, which silently starts one process)."""
    from labo_hf.examples.launch_lines import launch_lines

    sources = {"README.md": (readme_commands(), "run_translation.py")}
    for script in SCRIPTS:
        sources[f"{script} --help"] = (help_commands(script, capsys), script)
    for source, (commands, script) in sources.items():
        shown = [c for c in commands if c.startswith(("torchrun", "accelerate"))]
        assert sorted(shown) == sorted(launch_lines(script)), source
    text = "".join(path.read_text() for path in DOCS.values()) + "".join(help_text(s, capsys) for s in SCRIPTS)
    assert "launch --cpu" not in text and "--ddp_backend gloo" not in text


def test_all_outputs_go_under_one_ignored_folder(capsys):
    commands = [c for doc in DOCS for c in doc_commands(doc)] + [c for s in SCRIPTS for c in help_commands(s, capsys)]
    folders = {shlex.split(c)[shlex.split(c).index("--output_dir") + 1].split("/")[0]
               for c in commands if "--output_dir" in c}
    assert folders == {"outputs"}
    python = "".join(block for path in DOCS.values() for block in _blocks(path.read_text(), "python"))
    assert set(re.findall(r"output_dir=\"([^/\"]+)", python)) <= {"outputs"}
    ignored = subprocess.run(["git", "check-ignore", "-q", "outputs/any/file"], cwd=ROOT)
    assert ignored.returncode == 0, "outputs/ is not ignored by .gitignore"


def _readme_namespace(tmp_path: Path, monkeypatch) -> dict:
    """What the README's snippets assume the reader has: a model, its data and collator, logits and labels."""
    import datasets
    from datasets import Dataset

    task = TASKS["marian"]
    model = task.make_model()

    def collator(examples):
        batch = collate(examples)
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return batch

    texts = ["the cat sat.", "a dog ran far.", "we go to the sea.", "so it goes."] * 4

    def load_dataset(name, *args, **kwargs):
        assert name in HUB_DATASETS, f"map the data set {name} to local data in HUB_DATASETS"
        return Dataset.from_dict({"text": texts})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    generator = torch.Generator().manual_seed(0)
    return {"model": model, "train": task.make_examples(8, seed=1), "val": task.make_examples(4, seed=2),
            "collator": collator, "tokenizer": None, "logits": torch.randn(4, 6, 11, generator=generator),
            "labels": torch.randint(0, 11, (4, 6), generator=generator)}


@pytest.mark.parametrize("doc", list(DOCS))
def test_readme_python_blocks_run(doc, hub, tmp_path, monkeypatch):
    """Each block in order, in one namespace, as a reader pasting them into one session (Hub names -> local)."""
    monkeypatch.chdir(tmp_path)
    namespace = _readme_namespace(tmp_path, monkeypatch)
    for number, block in enumerate(_blocks(DOCS[doc].read_text(), "python")):
        for name, local in HUB_MODELS.items():
            block = block.replace(f'"{name}"', repr(str(hub / local)))
        block = re.sub(r"max_steps=\d+", "max_steps=2", block)
        exec(compile(block, f"{doc} python block {number}", "exec"), namespace)  # noqa: S102
    if ".train()" in DOCS[doc].read_text():
        assert (tmp_path / "outputs").is_dir()


def _run_documented(command: str, hub: Path, cwd: Path, monkeypatch) -> None:
    tokens = shlex.split(command)
    while tokens and re.match(r"[A-Z_]+=", tokens[0]):
        tokens.pop(0)
    if tokens[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]):
        return  # the test suite itself
    if tokens[0] in ("torchrun", "accelerate"):
        return  # checked by test_launch_lines_have_one_source and run by test_cpu_accelerate_line_runs
    script = tokens[1]
    if script.startswith("bench/"):
        module = __import__(Path(script).stem)
        module.parse_args(tokens[2:])
        return
    assert script in SCRIPTS, command
    run_script(script, smoke_args(script, tokens[2:], hub, cwd), cwd, monkeypatch)


def _split_setup(command: str) -> list[str]:
    """The commands of a set-up line; the venv and pip parts are checked, not run."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    parts = []
    for part in (p.strip() for p in command.split("&&")):
        if part.startswith(("python3 -m venv", ". .venv/bin/activate")):
            continue
        if part.startswith("pip install"):
            for extra in re.findall(r"\.\[([a-z,]+)\]", part):
                assert all(f"\n{name} = [" in pyproject for name in extra.split(",")), part
            continue
        parts.append(part)
    return parts


@pytest.mark.parametrize("source", [*DOCS, *SCRIPTS])
def test_documented_commands_run(source, hub, tmp_path, monkeypatch, capsys):
    """Every command line of the README (bash blocks) or of a script's --help, in smoke form, in order, in one
    working folder (so that a resume line finds the run before it)."""
    commands = doc_commands(source) if source in DOCS else help_commands(source, capsys)
    assert commands
    for command in commands:
        for part in _split_setup(command):
            _run_documented(part, hub, tmp_path, monkeypatch)
    assert (tmp_path / "outputs").is_dir()


def test_cpu_accelerate_line_runs(hub, tmp_path):
    """The documented CPU multi-process accelerate line starts two processes (world size 2)."""
    from labo_hf.examples.launch_lines import CPU_LAUNCH_LINES

    line = next(line for line, _ in CPU_LAUNCH_LINES if line.startswith("accelerate"))
    script = "run_image_classification.py"
    args = smoke_args(script, ["--output_dir", "outputs/ddp", "--log_level_replica", "info"], hub, tmp_path)
    tokens = shlex.split(line.format(script=ROOT / script, args="ARGS"))
    index = tokens.index("ARGS")
    tokens[index:index + 1] = args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(tokens, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log[-4000:]
    assert "Process rank: 0, world size: 2" in log and "Process rank: 1, world size: 2" in log
    assert "find_unused_parameters=True" not in log  # DDP's warning that the search for unused ones was needless
    assert "UserWarning" not in log


def test_single_process_from_a_multi_process_request_warns(monkeypatch, caplog):
    """What `accelerate launch --num_processes 2 SCRIPT` gives the script on a machine without GPUs (its
    single-process launcher: MASTER_ADDR for 2 processes, no WORLD_SIZE): the script says so."""
    from types import SimpleNamespace

    from labo_hf.examples.launch import check_launch_matches_world_size

    args = SimpleNamespace(world_size=1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with caplog.at_level("WARNING"):
        check_launch_matches_world_size(args)  # accelerate launch of one process: nothing to say
    assert not caplog.records
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with caplog.at_level("WARNING"):
        check_launch_matches_world_size(args)
    assert len(caplog.records) == 1 and "--multi_gpu" in caplog.records[0].getMessage()
