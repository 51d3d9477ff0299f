"""The shape of the code, read from its source: no import cycles (type-only imports count),
project modules imported at module top, small modules and functions.

``lint-imports`` (import-linter, in ``make lint``) checks the layers named in pyproject.toml;
this test also covers modules no contract names yet.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streams", "entities")
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 100
# imports inside functions allowed: optional dependencies, imported only when asked for
OPTIONAL = {"streams._backends.postgres"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, tree: ast.Module) -> Iterator[tuple[ast.stmt, set[str]]]:
    """Each import statement of ``module`` with the project modules it names."""
    base = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str]
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = node.module or ""
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                prefix = anchor + ("." + prefix if prefix else "")
            targets = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        hits = {hit for hit in map(_resolve, targets) if hit and hit != module}
        if hits:
            yield node, hits


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


TREES = {module: ast.parse(path.read_text()) for module, path in MODULES.items()}


def _graph() -> dict[str, set[str]]:
    return {m: set().union(*(h for _n, h in _imports(m, t))) for m, t in TREES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert len(MODULES) > 50  # the walk found the packages
    assert _cycles(_graph()) == []


def test_project_modules_are_imported_at_module_top() -> None:
    inner = []
    for module, tree in TREES.items():
        at_top = set(tree.body)
        for node, hits in _imports(module, tree):
            if node not in at_top and not _guarded(tree, node) and not hits <= OPTIONAL:
                inner.append(f"{MODULES[module].relative_to(ROOT)}:{node.lineno}")
    assert inner == []


def _guarded(tree: ast.Module, node: ast.stmt) -> bool:
    """Whether ``node`` sits in a module-level ``if TYPE_CHECKING:`` block."""
    for statement in tree.body:
        if isinstance(statement, ast.If) and node in statement.body:
            return True
    return False


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_small(module: str) -> None:
    path = MODULES[module]
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"
    long = {
        f.name: (f.end_lineno or f.lineno) - f.lineno + 1
        for f in _functions(TREES[module])
        if (f.end_lineno or f.lineno) - f.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long == {}, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines"
