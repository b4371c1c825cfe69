"""The core's modules import one another without a cycle (``liptune.bounds`` and
``liptune.export`` once did), imports inside functions included; the bound keeps its second
public name ``liptune.export.lipschitz_upper_bound``."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "liptune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Each core module -> the core modules it names in any import statement (a package's
    ``__init__`` that a submodule's import runs is not counted, as import-linter does not)."""
    paths = {_module_name(path): path for path in CORE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                named.add(base)
                named.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {module for module in named if module in paths and module != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for following in sorted(graph[module]):
            if state.get(following) == "open":
                return [*path[path.index(following) :], following]
            if following not in state and (found := visit(following)):
                return found
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_core_modules_import_each_other_without_a_cycle() -> None:
    graph = _import_graph()
    assert "liptune.export" not in graph["liptune.bounds"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_cycle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_bound_keeps_its_export_name() -> None:
    from liptune.bounds import lipschitz_bound
    from liptune.export import lipschitz_upper_bound

    assert lipschitz_upper_bound is lipschitz_bound
