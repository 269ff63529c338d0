"""The project's shape: layers as folders with dependencies pointing one way, small modules, thin example scripts,
and a core package that needs only torch, transformers and accelerate (what the scripts and benchmarks need on top
comes with the ``examples`` extra)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from labo_hf.examples import EXTRA_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(ROOT.glob("run_*.py"))
MAX_SCRIPT_LINES = 600
MAX_FUNCTION_LINES = 120

CORE = {"torch", "transformers", "accelerate"}
# Top-level modules only the example scripts and benchmarks use, by the distribution that provides them: what the
# scripts' runtime checks for at import, plus the plots' matplotlib.
EXAMPLE_ONLY_MODULES = {**EXTRA_PACKAGES, "matplotlib": "matplotlib"}
# The package's layers in dependency order: a module may import labo_hf.<layer> only for layers at or before its own.
LAYERS = ["kernels", "loss", "hf", "analysis", "examples"]
PACKAGE = ROOT / "labo_hf"
# Modules whose imports the examples extra must cover: the scripts' runtime, and the plots (matplotlib).
EXTRA_USING_FILES = [*sorted((PACKAGE / "examples").glob("*.py")), PACKAGE / "analysis" / "figures.py"]
# Library modules built on an optional dependency (in the dev extra, not a core one), by the top-level module they
# import: only they import it, and `import labo_hf` reaches them lazily.
OPTIONAL_DEPENDENCY_MODULES = {"sft_trainer": "trl"}
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 300
MAX_LIBRARY_FUNCTION_LINES = 80
# Every public name of labo_hf 0.1, importable from the package itself.
PUBLIC_NAMES = {
    "FusedLinearLABOLoss", "LABOHandle", "LABOLoss", "LABOLossFunction", "LABOLossMixin", "LABOSFTConfig",
    "LABOSFTTrainer", "LABOSeq2SeqTrainer", "LABOSeq2SeqTrainingArguments", "LABOTrainer", "LABOTrainingArguments",
    "LabelRegularization", "LossConfig", "LossStats", "RunGuardMixin", "apply_labo", "check_loss_stats",
    "fused_linear_label_regularized_loss", "fused_linear_label_regularized_loss_with_stats", "label_regularized_loss",
    "label_regularized_loss_per_position", "label_regularized_loss_with_stats", "labo_loss_func", "labo_target",
    "remove_labo",
}
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
    files = SCRIPTS + bench + EXTRA_USING_FILES
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


def _layer(path: Path) -> str | None:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else None


def _labo_imports(path: Path) -> set[str]:
    """The labo_hf layers `path` imports (absolute imports only: the package uses no relative ones)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(ROOT)}:{node.lineno} uses a relative import"
            modules = [node.module or ""]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "labo_hf" and len(parts) > 1:
                layers.add(parts[1])
    return layers


def test_every_module_lives_in_a_layer_folder() -> None:
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert top == ["__init__.py"], f"modules outside the layer folders: {top}"
    folders = sorted(path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__")
    assert folders == sorted(LAYERS)


def test_dependencies_point_one_way() -> None:
    """kernels -> loss -> hf -> analysis -> examples: no module imports a later layer."""
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        allowed = set(LAYERS[: LAYERS.index(layer) + 1]) if layer else {"loss", "hf"}
        used = _labo_imports(path) - allowed
        assert not used, f"{path.relative_to(ROOT)} ({layer or 'package root'}) imports the later layers {sorted(used)}"


def test_only_scripts_and_benchmarks_import_the_examples_runtime() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        if _layer(path) != "examples":
            assert "examples" not in _labo_imports(path), f"{path.relative_to(ROOT)} imports labo_hf.examples"


def test_wheel_ships_the_library_without_the_examples_runtime() -> None:
    tomllib = pytest.importorskip("tomllib")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    assert sorted(packages) == sorted(["labo_hf", *(f"labo_hf.{layer}" for layer in LAYERS if layer != "examples")])


def _jit_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(decorator) for decorator in getattr(node, "decorator_list", []))


def test_modules_classes_and_functions_stay_small() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT)
        assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{name} has {len(source.splitlines())} lines"
        for node in ast.walk(ast.parse(source)):
            length = (getattr(node, "end_lineno", None) or 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef):
                assert length <= MAX_CLASS_LINES, f"{name}:{node.lineno} class {node.name} has {length} lines"
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not _jit_kernel(node):
                assert length <= MAX_LIBRARY_FUNCTION_LINES, (
                    f"{name}:{node.lineno} {node.name}() has {length} lines (at most {MAX_LIBRARY_FUNCTION_LINES})"
                )


def test_every_public_name_is_importable_from_the_package() -> None:
    import labo_hf

    assert set(labo_hf.__all__) == PUBLIC_NAMES
    for name in sorted(PUBLIC_NAMES):
        assert getattr(labo_hf, name) is not None


def test_tests_mirror_the_source_tree() -> None:
    tests = ROOT / "tests"
    folders = sorted(path.name for path in tests.iterdir() if path.is_dir() and not path.name.startswith((".", "_")))
    assert folders == sorted([*LAYERS, "bench"])
    assert not sorted(tests.glob("test_*.py"))[1:], "tests outside the layer folders (only the layout test is)"


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


def test_architecture_page_names_every_module() -> None:
    """docs/architecture.md has one line per module: a new module without its line fails here."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
               if path.name != "__init__.py" and f"| `{path.relative_to(PACKAGE)}` |" not in page]
    assert not missing, f"modules without their line in docs/architecture.md: {missing}"
