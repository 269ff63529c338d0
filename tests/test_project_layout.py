"""The project's shape: thin example scripts, and a core package that needs only torch, transformers and
accelerate (what the scripts and benchmarks need on top comes with the ``examples`` extra)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(ROOT.glob("run_*.py"))
MAX_SCRIPT_LINES = 600
MAX_FUNCTION_LINES = 120

CORE = {"torch", "transformers", "accelerate"}
# Top-level modules only the example scripts and benchmarks use, by the distribution that provides them.
EXAMPLE_ONLY_MODULES = {
    "datasets": "datasets",
    "sacrebleu": "sacrebleu",
    "sentencepiece": "sentencepiece",
    "tokenizers": "tokenizers",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",
}
# Script-side modules of the package: imported by the scripts, never by the library.
SCRIPT_SIDE_MODULES = ["data_checks", "examples", "image_data", "output_folder", "script_utils", "seq2seq_from_scratch",
                       "translation_data"]
# Modules whose imports the examples extra must cover: the script side, and the plots (matplotlib).
EXTRA_USING_MODULES = [*SCRIPT_SIDE_MODULES, "visualize"]
# Library modules built on an optional dependency (in the dev extra, not a core one), by the top-level module they
# import: only they import it, and `import labo_hf` reaches them lazily.
OPTIONAL_DEPENDENCY_MODULES = {"trl_trainer": "trl"}
# Installed with transformers itself, or optional and imported behind a check (GPU benchmarks).
TRANSITIVE_OR_OPTIONAL = {"numpy", "safetensors", "huggingface_hub", "triton", "liger_kernel"}


def test_example_scripts_stay_thin() -> None:
    assert SCRIPTS, "no run_*.py found"
    for script in SCRIPTS:
        source = script.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        assert lines <= MAX_SCRIPT_LINES, f"{script.name} has {lines} lines (at most {MAX_SCRIPT_LINES})"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, (
                    f"{script.name}:{node.lineno} {node.name}() has {length} lines (at most {MAX_FUNCTION_LINES})"
                )


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_core_dependencies_are_torch_transformers_accelerate() -> None:
    project = _project()
    assert {_distribution(r) for r in project["dependencies"]} == CORE
    # labo_hf/_compat.py reaches into transformers 5 internals: a new major version must be checked first.
    assert "transformers>=5,<6" in project["dependencies"]
    assert "version" in project["dynamic"] and "version" not in project  # one source: labo_hf.__version__
    dev = project["optional-dependencies"]["dev"]
    assert any(r.startswith("labo-hf[") and "examples" in r for r in dev)
    assert {"pytest", "trl", "peft"} <= {_distribution(r) for r in dev}


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


def test_examples_extra_covers_what_scripts_and_benchmarks_import() -> None:
    bench = sorted((ROOT / "bench").glob("*.py"))
    files = SCRIPTS + bench + [ROOT / "labo_hf" / f"{name}.py" for name in EXTRA_USING_MODULES]
    local = {"labo_hf"} | {path.stem for path in bench}
    imported = set().union(*(_third_party_imports(path) for path in files)) - local - TRANSITIVE_OR_OPTIONAL
    unknown = imported - CORE - set(EXAMPLE_ONLY_MODULES)
    assert not unknown, f"imported but neither core nor in the examples extra's table: {sorted(unknown)}"
    examples = {_distribution(r) for r in _project()["optional-dependencies"]["examples"]}
    missing = {EXAMPLE_ONLY_MODULES[name] for name in imported - CORE} - examples
    assert not missing, f"imported by the scripts or benchmarks but not in the examples extra: {sorted(missing)}"


def test_core_import_and_loss_load_no_example_only_package() -> None:
    code = (
        "import sys, torch, labo_hf\n"
        "labo_hf.label_regularized_loss(torch.randn(4, 5), torch.tensor([0, 1, 2, -100]))\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(EXAMPLE_ONLY_MODULES)})))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "", f"example-only modules imported: {completed.stdout.strip()}"


def test_library_never_imports_the_script_side() -> None:
    """Dependencies point one way: kernels -> loss -> Trainer glue -> scripts."""
    for path in sorted((ROOT / "labo_hf").rglob("*.py")):
        if path.parent == ROOT / "labo_hf" and path.stem in SCRIPT_SIDE_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [module.split(".")[-1]] + [alias.name for alias in node.names]
                if node.level == 0 and not module.startswith("labo_hf"):
                    names = []
            elif isinstance(node, ast.Import):
                names = [alias.name.split(".")[-1] for alias in node.names if alias.name.startswith("labo_hf.")]
            used = set(names) & set(SCRIPT_SIDE_MODULES)
            assert not used, f"{path.relative_to(ROOT)} imports the script-side {sorted(used)}"


def test_optional_dependencies_stay_in_their_modules() -> None:
    for path in sorted((ROOT / "labo_hf").rglob("*.py")):
        imported = _third_party_imports(path)
        for module, dependency in OPTIONAL_DEPENDENCY_MODULES.items():
            if path.stem != module:
                assert dependency not in imported, f"{path.relative_to(ROOT)} imports the optional {dependency}"
    assert not set(OPTIONAL_DEPENDENCY_MODULES.values()) & CORE
    code = (
        "import sys, labo_hf\n"
        "assert 'LABOSFTTrainer' in labo_hf.__all__\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(OPTIONAL_DEPENDENCY_MODULES.values())})))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "", f"optional dependencies imported by `import labo_hf`: {completed.stdout}"
