"""Project rules that a linter alone does not check, plus ruff and mypy themselves."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(folder: str) -> dict[str, set[str]]:
    """Top-level names of every module imported by each file under ``folder``."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_production_never_imports_jax():
    offenders = [f for f, names in _imported_modules("production").items() if "jax" in names]
    assert not offenders


def test_reference_never_imports_torch():
    offenders = [f for f, names in _imported_modules("reference").items() if "torch" in names]
    assert not offenders


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_is_clean(command):
    if shutil.which(command[0]) is None:
        pytest.fail(f"{command[0]} is not installed: pip install -e '.[test]'")
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _imported_paths(folder: str) -> dict[str, set[str]]:
    """Dotted names each file under ``folder`` imports (relative ones with their dots)."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                names.update([module] if node.module else [module + a.name for a in node.names])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_conformance_library_never_imports_its_command_line():
    # The CLI (eplb._cli_conformance) sits on top of the library, never below it.
    offenders = {
        file: sorted(n for n in names if n.startswith(("eplb.cli", "eplb._cli", ".cli")))
        for file, names in _imported_paths("conformance").items()
    }
    assert not {file: names for file, names in offenders.items() if names}
    assert not (ROOT / "conformance" / "cli.py").exists()  # the command moved to eplb/


def test_engine_adapters_import_no_engine():
    imported = set().union(*_imported_modules("eplb/integrations").values())
    assert not imported & {"vllm", "sglang"}
