"""The import graph of common/, eval_daemon/ and train_daemon/, read with ast: no cycles, and every module
at common/ top level is imported (directly or transitively) by a daemon, as STYLE.md's layout says."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "eval_daemon", "train_daemon")
ENTRY_POINTS = ("eval_daemon.__main__", "train_daemon.__main__")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the packages (a package is its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """{module: the modules of the packages it imports}, counting imports inside functions too."""
    modules = module_files(root, packages)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, is_package)
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                               for alias in node.names)
        graph[name] = {_owning_module(target, modules) for target in targets} - {None, name}
    return graph


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owning_module(target: str, modules: dict[str, Path]) -> str | None:
    """The longest known module name that `target` names or lies in (None outside the packages)."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}  # "active" while on the stack, "done" after
    stack: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "active"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "active":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def reachable(graph: dict[str, set[str]], starts: tuple[str, ...]) -> set[str]:
    seen, todo = set(), [start for start in starts if start in graph]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def unused_common_modules(root: Path, graph: dict[str, set[str]], starts: tuple[str, ...]) -> list[str]:
    """Modules at common/ top level (common/*.py) that no entry point imports, directly or transitively."""
    top_level = [f"common.{path.stem}" for path in (root / "common").glob("*.py") if path.stem != "__init__"]
    used = reachable(graph, starts)
    return sorted(name for name in top_level if name not in used)


def test_no_import_cycle():
    cycle = find_cycle(import_graph(REPO, PACKAGES))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_every_module_at_common_top_level_is_imported_by_a_daemon():
    graph = import_graph(REPO, PACKAGES)
    assert set(ENTRY_POINTS) <= set(graph)
    unused = unused_common_modules(REPO, graph, ENTRY_POINTS)
    assert not unused, f"used by neither daemon, so they belong in a package of their own user: {unused}"


def test_the_checks_find_a_cycle_and_an_unused_module(tmp_path):
    files = {
        "common/__init__.py": "",
        "common/a.py": "from common import b\n",
        "common/b.py": "def f():\n    from .a import thing\n",  # a lazy, relative import closes the cycle
        "common/orphan.py": "import json\n",
        "common/pkg/__init__.py": "",
        "common/pkg/tool.py": "import common.orphan\n",  # used only by a tool: still unused by the daemons
        "eval_daemon/__init__.py": "",
        "eval_daemon/__main__.py": "from common.a import x\n",
        "train_daemon/__init__.py": "",
        "train_daemon/__main__.py": "import common.b as b\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, PACKAGES)
    assert find_cycle(graph) == ["common.a", "common.b", "common.a"]
    assert unused_common_modules(tmp_path, graph, ENTRY_POINTS) == ["common.orphan"]
    (tmp_path / "common/b.py").write_text("import json\n")
    (tmp_path / "train_daemon/__main__.py").write_text("from common import orphan\n")
    graph = import_graph(tmp_path, PACKAGES)
    assert find_cycle(graph) == [] and unused_common_modules(tmp_path, graph, ENTRY_POINTS) == []
