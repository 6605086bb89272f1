"""The two wings: the library (everything in ``kd_lightning/`` but ``run/``) never imports the run wing, and no module
imports itself back through others. Read from the source with ``ast``: every import written in a module counts, the
ones inside functions too (a package's ``__init__`` counts when it is named; the parents Python imports on the way
do not)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kd_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """``{module: the kd_lightning modules it imports}``."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        graph[name] = {module for module in found if module in modules and module != name}
    return graph


def in_run_wing(module: str) -> bool:
    return module == "kd_lightning.run" or module.startswith("kd_lightning.run.")


def test_the_library_never_imports_the_run_wing() -> None:
    upward = {
        (module, target)
        for module, targets in imports().items()
        for target in targets
        if not in_run_wing(module) and module != "kd_lightning.__main__" and in_run_wing(target)
    }
    assert not upward, sorted(upward)


def test_no_module_imports_itself_back() -> None:
    graph = imports()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return seen

    cycles = sorted(module for module in graph if module in reaches(module))
    assert not cycles, cycles
