"""The package layout: no import cycles, stage rooms independent, no flat module paths left."""

from __future__ import annotations

import ast
from pathlib import Path

import gristmill

PACKAGE_DIR = Path(gristmill.__file__).parent
STAGE_ROOMS = ("crawl", "extract", "filter", "dedup", "pii")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every gristmill module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    modules = set(paths)
    graph = {name: imported_modules(path, modules) for name, path in paths.items()}
    for name, imports in graph.items():  # a package's own __init__ is not a cycle partner
        imports.discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_stage_rooms_import_the_engine_never_each_other():
    graph = import_graph()
    for room in STAGE_ROOMS:
        prefix = f"gristmill.pipeline.{room}"
        for module, imports in graph.items():
            if not module.startswith(prefix):
                continue
            others = {
                target for target in imports
                for other in STAGE_ROOMS
                if other != room and target.startswith(f"gristmill.pipeline.{other}")
            }
            assert not others, f"{module} imports another stage's room: {sorted(others)}"


def test_every_stage_room_is_a_package_that_says_where_to_start():
    for room in STAGE_ROOMS:
        init = PACKAGE_DIR / "pipeline" / room / "__init__.py"
        assert init.exists(), f"{init} is missing"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "stage.py" in doc, f"{init}: the docstring should say where to start reading"


def test_no_flat_prefixed_modules_remain_in_pipeline():
    flat = sorted(path.name for path in (PACKAGE_DIR / "pipeline").glob("*.py"))
    prefixed = [name for name in flat if any(name.startswith(f"{room}_") for room in STAGE_ROOMS)]
    assert prefixed == []
    assert not (PACKAGE_DIR / "workflow.py").exists()
