"""The layout the README promises: no import cycle among factscope's modules, no module over 600 lines, and the
torch-free modules stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import factscope

PACKAGE = Path(factscope.__file__).parent
MAX_LINES = 600


def modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path) -> set[str]:
    """factscope modules that `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module or "")
            candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c.startswith("factscope")}
    return found


def test_no_import_cycles():
    known = modules()
    graph = {name: {dep for dep in imports(name, path) if dep in known and dep != name} for name, path in known.items()}
    graph = {name: deps - {"factscope"} for name, deps in graph.items()}  # the package's lazy exports are not imports
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " → ".join([*trail, node, dep]))
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_module_is_over_600_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_torch_free_modules_import_without_torch():
    torch_free = ["factscope", "factscope.taxonomy", "factscope.data", "factscope.rundir", "factscope.mechanisms",
                  "factscope.bootstrap", "factscope.breadth", "factscope.report", "factscope.cli", "factscope.causal_readings"]
    code = f"import sys; import {', '.join(torch_free)}; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
