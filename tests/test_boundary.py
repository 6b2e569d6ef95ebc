"""The core never loads torch: `memplan estimate` and `memplan fits` run without it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import memplan

PACKAGE = Path(memplan.__file__).resolve().parent
HEAVY = ("torch", "transformers", "matplotlib")

# Runs commands through CliRunner in a fresh interpreter, then reports the heavy modules loaded.
PROBE = r"""
import json, sys
from typer.testing import CliRunner
from memplan.cli.app import load_commands

app = load_commands()
runner = CliRunner()
codes = []
for args in json.loads(sys.argv[1]):
    codes.append(runner.invoke(app, args).exit_code)
heavy = sorted({m.split('.')[0] for m in sys.modules} & {"torch", "transformers", "matplotlib"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""

COMMANDS = [
    (["estimate", "--params", "7e9", "--rank", "8"], 0),
    (["estimate", "--model", "llama-2-7b", "--batch", "2", "--seq", "512", "--json"], 0),
    (["estimate", "--model", "gpt2", "--batch", "1", "--seq", "128", "--attention", "eager",
      "--checkpointing"], 0),
    (["fits", "--model", "gpt2", "--regime", "lora", "--gpu", "h100-80gb"], 0),
    (["fits", "--model", "llama-2-70b", "--regime", "full", "--gpu", "t4", "--json"], 1),
    (["fits", "--model", "gpt2", "--gpu", "t4", "--seq", "512"], 0),
    (["fits", "--params", "abc", "--gpu", "t4"], 2),
    (["gpus"], 0),
    (["models", "--json"], 0),
    (["estimate", "--model", "llama-2-7b", "--gpus", "8", "--batch", "1", "--seq", "512"], 0),
    (["scale", "--model", "llama-2-70b", "--gpu", "h100-80gb", "--json"], 0),
    (["scale", "--model", "llama-2-7b", "--gpu", "t4", "--regime", "classifier"], 2),
]


def test_commands_do_not_load_torch() -> None:
    args = json.dumps([a for a, _ in COMMANDS])
    out = subprocess.run([sys.executable, "-c", PROBE, args], capture_output=True, text=True,
                         timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["codes"] == [code for _, code in COMMANDS]
    assert report["heavy"] == []


@pytest.mark.parametrize("args", [
    ["estimate", "--params", "7e9", "--rank", "8", "--json"],
    ["fits", "--model", "gpt2", "--regime", "lora", "--gpu", "h100-80gb", "--json"],
])
def test_python_m_memplan_import_time(args: list[str]) -> None:
    """`python -X importtime -m memplan ...` lists every module imported: none of the heavy."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "memplan", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    json.loads(out.stdout)  # the command really ran and printed its JSON
    imported = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[-1].strip()
            imported.add(name.split(".")[0])
    assert "memplan" in imported and "typer" in imported  # the probe sees imports at all
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_importing_memplan_does_not_load_torch() -> None:
    code = ("import sys, memplan, memplan.planner, memplan.report, memplan.config, "
            "memplan.shapes, memplan.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))")
    out = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ---- by reading the source -------------------------------------------------------------------

def _core_files() -> list[Path]:
    files = [*PACKAGE.glob("*.py"), *(PACKAGE / "cli").glob("*.py"),
             *(PACKAGE / "presets").glob("*.py")]
    return sorted(files)


def _import_time_nodes(tree: ast.Module):
    """Import statements executed when the module is imported: not inside functions."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against memplan
        return [f"memplan.{node.module or ''}"]
    return [node.module or ""]


def test_core_files_found() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in _core_files()}
    assert {"planner.py", "spec.py", "cli/app.py", "cli/estimate.py", "presets/__init__.py"} \
        <= names
    assert not any(n.startswith(("nn/", "profile/")) for n in names)


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_top_level_heavy_import(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in _import_time_nodes(tree):
        for module in _modules(node):
            top = module.split(".")[0]
            assert top not in HEAVY, f"{path}:{node.lineno} imports {module} at import time"


def _imports_nn_or_profile(node: ast.Import | ast.ImportFrom) -> bool:
    if any(m.startswith(("memplan.nn", "memplan.profile")) for m in _modules(node)):
        return True
    return (isinstance(node, ast.ImportFrom) and node.module == "memplan"
            and bool({a.name for a in node.names} & {"nn", "profile"}))


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_never_imports_nn_or_profile(path: Path) -> None:
    """One direction only: nn/ and profile/ use the core, never the reverse. The analytic
    modules never import them at all; the CLI's profile/validate commands may, lazily."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_cli = path.parent.name == "cli"
    nodes = _import_time_nodes(tree) if in_cli else (
        n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))
    for node in nodes:
        assert not _imports_nn_or_profile(node), f"{path}:{node.lineno} imports nn/profile"


def test_ast_walker_catches_a_top_level_import() -> None:
    tree = ast.parse("import os\ntry:\n    import torch\nexcept ImportError:\n    pass\n"
                     "def f():\n    import matplotlib\n")
    found = [m for node in _import_time_nodes(tree) for m in _modules(node)]
    assert sorted(found) == ["os", "torch"]
