"""Layers import downward only: core -> engines -> scheduler and service -> HTTP edge -> CLI.

Every import statement of every module counts, wherever it is (module level, inside a function, under
TYPE_CHECKING): a lazy import is still a dependency. A new rule is one line in LAYER_RULES.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# What only the HTTP edge and the CLI may know: the web framework, metrics, settings, statuses and wiring.
EDGE = (
    "fastapi",
    "starlette",
    "prometheus_client",
    "pydantic_settings",
    "pydantic",
    "gateway.config",
    "gateway.metrics",
    "gateway.errors",
    "gateway.app",
    "gateway.routes",
    "gateway.dialects",
    "gateway.admission",
    "gateway.compose",
    "gateway.cli",
    "gateway.commands",
)
# A package or module of this repository (dotted), then the top-level names or dotted prefixes that no
# module in it may import.
LAYER_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("engines", "gateway", "fastapi", "starlette", "prometheus_client", "pydantic_settings")),
    ("engines", ("gateway", "fastapi", "starlette", "prometheus_client", "pydantic_settings")),
    # The scheduler and the service sit below the HTTP edge; neither knows the other.
    ("gateway.scheduler", (*EDGE, "gateway.service")),
    ("gateway.service", (*EDGE, "gateway.scheduler")),
]
# Packages whose modules must not import each other in a cycle (lazy imports included).
ACYCLIC_PACKAGES = ("core", "engines")


def modules_of(target: str) -> list[Path]:
    path = REPO_ROOT / Path(*target.split("."))
    if path.with_suffix(".py").is_file():
        return [path.with_suffix(".py")]
    return sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of everything `source` imports; relative imports are resolved against `module`."""
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level]
                base = ".".join([*package, base] if base else package)
            # `from engines import model_store` imports engines.model_store; both names are reported.
            names.append((node.lineno, base))
            names.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*")
    return sorted(names, key=lambda item: item[0])


def forbidden_imports(source: str, module: str, forbidden: tuple[str, ...]) -> list[str]:
    """One line per offending import statement, naming what it imports first."""
    problems: dict[int, str] = {}
    for line, name in imported_names(source, module):
        if line not in problems and any(name == f or name.startswith(f + ".") for f in forbidden):
            problems[line] = f"{module}:{line} imports {name}"
    return list(problems.values())


@pytest.mark.parametrize(("target", "forbidden"), LAYER_RULES, ids=[t for t, _ in LAYER_RULES])
def test_layer_imports_nothing_from_the_layers_above(target: str, forbidden: tuple[str, ...]):
    files = modules_of(target)
    assert files, f"no modules found for {target}"
    problems = [
        problem
        for path in files
        for problem in forbidden_imports(path.read_text(encoding="utf-8"), module_name(path), forbidden)
    ]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("package", ACYCLIC_PACKAGES)
def test_modules_of_a_package_import_each_other_without_cycles(package: str):
    modules = {module_name(p): p for p in modules_of(package)}
    graph = {
        name: {
            target
            for _, imported in imported_names(path.read_text(encoding="utf-8"), name)
            for target in modules
            if target != name and imported == target
        }
        for name, path in modules.items()
    }
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in trail:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt, [*trail, nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_lazy_relative_and_type_checking_imports():
    source = """
from typing import TYPE_CHECKING
import fastapi.routing
if TYPE_CHECKING:
    from gateway.config import Settings
def f():
    from gateway import metrics
from ..gateway import app
from . import sibling
from prometheus_client_extra import x
"""
    problems = forbidden_imports(source, "engines.router", ("gateway", "fastapi", "prometheus_client"))
    named = [p.split(" imports ")[1] for p in problems]
    assert named == ["fastapi.routing", "gateway.config", "gateway", "gateway"]
    assert (9, "engines.sibling") in imported_names(source, "engines.router")
