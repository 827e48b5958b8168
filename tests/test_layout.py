"""The package's shape: imports point one way down the layers, no module cycles, a light start-up."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tlcli"
LAYERS = ["cli", "pipeline", "train", "explain", "models", "data", "store", "base"]
"""Top to bottom: a module may import its own layer and the ones below it, never one above."""


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """tlcli module -> the tlcli modules it imports anywhere (function-level imports included)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(f"{node.module}.{a.name}" for a in node.names)
                found.add(node.module)
        graph[name] = {m for m in found if m in modules and m != name and m != "tlcli"}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    top = "cli" if module == "tlcli.__main__" else parts[1] if len(parts) > 1 else "base"
    return LAYERS.index(top if top in LAYERS else "base")


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_point_down_the_layers():
    upward = [
        f"{a} imports {b}" for a, deps in sorted(_imports().items()) for b in sorted(deps) if _layer(b) < _layer(a)
    ]
    assert upward == [], "\n".join(upward)


@pytest.mark.parametrize(
    "args", [["--help"], ["runs", ".", "--json"], ["fetch-data", "--list", "--json"], ["backbones"]]
)
def test_commands_that_run_no_model_import_no_tensorflow(args, tmp_path):
    code = (
        "import sys\nfrom tlcli.cli.app import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules)\n"
        "print('HEAVY', __import__('json').dumps(heavy), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("HEAVY ")][-1]
    assert json.loads(line[6:]) == [], f"tlcli {' '.join(args)} imported {line[6:]}"
