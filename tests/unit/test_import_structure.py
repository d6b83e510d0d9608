"""The import graph of the project's own packages has no cycle, lazy (in-function) imports included: a cycle makes
the import order matter and hides which module owns what. A package's `__init__` counts as imported by whoever
imports one of its modules from outside it, as Python runs it first."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("npu_sft", "flows", "tasks")


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.parent.relative_to(ROOT).parts == ("npu_sft", "engine", "scripts"):  # run in the engine env
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        targets = {target for target in imported if target in modules and target != name}
        # Importing `a.b.c` runs `a/b/__init__.py` first, unless the importer is inside `a.b` (then it already runs).
        parents = {
            ".".join(target.split(".")[:depth])
            for target in targets
            for depth in range(1, target.count(".") + 1)
        }
        graph[name] = targets | {
            parent for parent in parents
            if parent in modules and parent != name and not name.startswith(f"{parent}.")
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_project_imports_itself_back() -> None:
    graph = import_graph()
    assert "npu_sft.cli" in graph and "flows.sft" in graph and "tasks.train" in graph
    assert cycles(graph) == []
