"""Imports flow one way: core <- methods <- stages <- cli, with no cycle at any level."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "methods")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its body (function level too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for imported in names:
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            # a package's own __init__ is not a dependency of its submodules
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_project_modules():
    graph = _graph()
    assert "benchmark.pretrain" in graph and "methods.concl" in graph
    assert _cycles(graph) == []


def test_methods_depend_on_the_core_only():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("methods"):
            harness = {
                d for d in deps if d.startswith("benchmark") and not d.startswith("benchmark.core")
            }
            assert not harness, f"{name} imports harness modules {sorted(harness)}"


def test_the_core_imports_no_stage_and_no_plugin():
    for name, deps in _graph().items():
        if name.startswith("benchmark.core"):
            assert all(d.startswith("benchmark.core") for d in deps), (name, deps)


TORCH_MLFLOW_OPTUNA = {"torch", "mlflow", "optuna"}


@pytest.mark.parametrize(
    ("code", "heavy"),
    [
        ("import benchmark.cli", TORCH_MLFLOW_OPTUNA),
        (
            "import benchmark.core.contracts, benchmark.core.registry, benchmark.core.schema",
            TORCH_MLFLOW_OPTUNA,
        ),
        ("import benchmark.config", TORCH_MLFLOW_OPTUNA),
        (
            "from benchmark.cli import build_parser; build_parser().format_help()",
            TORCH_MLFLOW_OPTUNA,
        ),
        ("import benchmark.tune.cli", {*TORCH_MLFLOW_OPTUNA, "pandas"}),
        # ``benchmark.pipeline`` imports it; the package loads its other modules on first use
        (
            "import benchmark.report.table",
            {"mlflow", "matplotlib", "torch", "benchmark.tracking"},
        ),
    ],
)
def test_light_entry_points_import_nothing_heavy(code: str, heavy: set[str]):
    check = f"{code}; import sys; print(sorted(set({sorted(heavy)!r}) & set(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
