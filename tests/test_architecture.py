"""The layering the README's "How it is built" describes, checked on every import (lazy ones too).

- No import cycle between modules, nor between packages (app.api, app.core, engines.quantize, …).
- engines/ is a plain library: it imports nothing from app/ or workers/.
- Nothing imports workers/ (the API publishes a job by task name).
- app.core imports no other part of app/; services and serving import no route; serving no service.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("app", "engines", "workers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module → the project modules it imports (anywhere in the file)."""
    modules = {_module_name(path): path for top in TOP_LEVEL for path in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.split(".")[0] in TOP_LEVEL:
                    graph[name].add(target)
        graph.setdefault(name, set())
    return graph


def _package(module: str) -> str:
    """The stage or layer a module belongs to: engines.quantize, app.api, … (a top-level file: itself)."""
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _imports()


def test_no_import_cycle_between_modules(graph: dict[str, set[str]]) -> None:
    assert _cycles(graph) == []


def test_no_import_cycle_between_packages(graph: dict[str, set[str]]) -> None:
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        packages[_package(module)] |= {_package(target) for target in targets} - {_package(module)}
    assert _cycles(packages) == []


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("engines", ("app", "workers")),
        ("app", ("workers",)),
        ("app.core", ("app.api", "app.services", "app.serving")),
        ("app.services", ("app.api",)),
        ("app.serving", ("app.api", "app.services")),
    ],
)
def test_layering(graph: dict[str, set[str]], importer: str, forbidden: tuple[str, ...]) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module == importer or module.startswith(importer + ".")
        for target in targets
        if any(target == prefix or target.startswith(prefix + ".") for prefix in forbidden)
    )
    assert wrong == []
