"""The package's layout rules, read off the installed package's own source files.

Imports run one way: the tools (``tapdisk.control``) over the daemon side (``tapdisk``),
over the drivers (``tapdisk.drivers``); no module imports another that imports it back,
directly or around a loop, and no module grows past 600 lines.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest
import tapdisk.control
import tapdisk.drivers

import tapdisk

MAX_LINES = 600


def modules() -> dict[str, Path]:
    """Every module of the installed package: dotted name -> source file.

    The rooms are walked one by one: an editable install maps ``tapdisk.drivers`` and
    ``tapdisk.control`` to folders beside ``tapdisk/``, where a walk of ``tapdisk`` alone
    does not look.
    """
    found: dict[str, Path] = {}
    for package in (tapdisk, tapdisk.drivers, tapdisk.control):
        assert package.__file__ is not None
        found[package.__name__] = Path(package.__file__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            spec = info.module_finder.find_spec(info.name, None)  # type: ignore[call-arg]
            assert spec is not None and spec.origin is not None, info.name
            found[info.name] = Path(spec.origin)
    return found


MODULES = modules()


def imported(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source, type-checking
    imports included (a cycle hidden behind TYPE_CHECKING is still a cycle for the reader)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def room(name: str) -> str:
    """The top-level room a module lives in: drivers, control, or the daemon side."""
    for top in ("tapdisk.drivers", "tapdisk.control"):
        if name == top or name.startswith(top + "."):
            return top
    return "tapdisk"


def test_the_walk_finds_every_room() -> None:
    assert {room(name) for name in MODULES} == {"tapdisk", "tapdisk.drivers", "tapdisk.control"}
    assert "tapdisk.drivers.base" in GRAPH["tapdisk.drivers.raw"]


def test_no_module_imports_itself_back() -> None:
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_loop() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("tapdisk.drivers", "tapdisk"),
        ("tapdisk.drivers", "tapdisk.control"),
        ("tapdisk", "tapdisk.control"),
    ],
)
def test_imports_run_one_way(lower: str, upper: str) -> None:
    wrong = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if room(name) == lower
        for target in targets
        if room(target) == upper and target != "tapdisk"
    )
    assert wrong == []


def test_a_format_package_does_not_import_another() -> None:
    formats = {"qcow", "qcow2", "vhd"}

    def fmt(name: str) -> str | None:
        parts = name.split(".")
        return parts[2] if len(parts) > 2 and parts[2] in formats else None

    wrong = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if fmt(name) and fmt(target) and fmt(name) != fmt(target)
    )
    assert wrong == []


def test_no_module_is_over_600_lines() -> None:
    long = {
        name: count
        for name, path in MODULES.items()
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
