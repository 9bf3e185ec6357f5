"""The import graph of ``src/amaml`` has no cycle, counting imports inside functions.

Every module is parsed with :mod:`ast` (nothing is imported); relative imports are
resolved against the module's package. A cycle, even one broken at run time by a lazy
import, means two modules each need the other: one of them says more than one thing.
Imports under ``if TYPE_CHECKING:`` never run (annotations only) and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "amaml"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(name: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports when it runs, anywhere in its body."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"))
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the
            # package (or module) that defines the name.
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix
                       for a in node.names]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` of a name inside a module: the longest known prefix.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_is_found() -> None:
    modules = _modules()
    for name in ("amaml", "amaml.cli", "amaml.experiments.training", "amaml.flow.adjoint"):
        assert name in modules


def test_import_graph_has_no_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, modules) for name in modules}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_detector_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("source,expected", [
    ("from .checkpoint import save", {"amaml.experiments.checkpoint"}),
    ("from .. import __version__", {"amaml"}),
    ("from ..flow import DiscreteAdjoint", {"amaml.flow"}),
    ("def f():\n    from ..tasks import make_family\n", {"amaml.tasks"}),
    ("import amaml.flow.loop", {"amaml.flow.loop"}),
    ("from . import evaluate", {"amaml.experiments.evaluate"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..flow import Euler\n",
     set()),
])
def test_imports_are_resolved(tmp_path: Path, source: str, expected: set[str]) -> None:
    modules = {**_modules(), "amaml.experiments.probe": tmp_path / "probe.py"}
    (tmp_path / "probe.py").write_text(source, encoding="utf-8")
    assert _imports("amaml.experiments.probe", modules) == expected
