"""The layers import downward only: ldm ← inversion ← apps ← experiments, bench; weights is a leaf.

Every import of a project package is read from the source (module tops and function bodies alike), so a lazy
import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("ldm", "inversion", "weights", "apps", "experiments", "bench", "tests")
ALLOWED = {
    "weights": {"weights"},
    "ldm": {"ldm"},
    "inversion": {"inversion", "ldm", "weights"},
    "apps": {"apps", "inversion", "ldm", "weights"},
    "experiments": {"experiments", "apps", "inversion", "ldm", "weights"},
    "bench": {"bench", "experiments", "apps", "inversion", "ldm", "weights"},
}
# the only reasons an import of the project may sit inside a function: an optional dependency behind it, or a
# cycle (the Triton kernels fall back to the reference attention, and their router imports them)
LAZY_FOR = {
    "ldm/attention.py": "triton",
    "ldm/kernels/": "triton; kernels ↔ routing ↔ ldm.attention",
    "apps/ui.py": "gradio",
}


def project_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported top-level project package, inside a function) for every import in a file."""
    tree = ast.parse(path.read_text())
    inner = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            else []
        )
        for name in names:
            top = name.split(".")[0]
            if top in PROJECT:
                found.append((node.lineno, top, id(node) in inner))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_itself_and_the_layers_below(layer):
    upward = [
        f"{p.relative_to(ROOT)}:{line} imports {top}"
        for p in sorted((ROOT / layer).rglob("*.py"))
        for line, top, _ in project_imports(p)
        if top not in ALLOWED[layer]
    ]
    assert not upward, upward


@pytest.mark.parametrize("layer", ["ldm", "inversion", "apps", "weights"])
def test_imports_sit_at_module_tops(layer):
    """Inside a function only where an optional dependency (triton, gradio) makes the module lazy."""
    inner = [
        f"{p.relative_to(ROOT)}:{line} imports {top}"
        for p in sorted((ROOT / layer).rglob("*.py"))
        for line, top, lazy in project_imports(p)
        if lazy and not str(p.relative_to(ROOT)).startswith(tuple(LAZY_FOR))
    ]
    assert not inner, inner


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef f():\n    from inversion import train\n")
    assert project_imports(bad) == [(4, "inversion", True)]
