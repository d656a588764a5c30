"""The layout rules of docs/LAYOUT.md, read from the import statements (those inside functions too)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import hikkoshi

SRC = Path(hikkoshi.__file__).parent
TESTS = Path(__file__).parent
PACKAGES = {d.name for d in SRC.iterdir() if d.is_dir() and any(d.glob("*.py"))}

LAYER = {
    "nbd": 0,
    "block": 1,
    "vm": 2,
    "daemons": 3,
    "migrate": 4,
    "cluster": 5,
    "drs": 5,
    "agent": 6,
    "cli": 7,
    "lab": 7,
    "web": 7,
}
"""Each package imports only those of a lower number, and itself."""
ALSO_ALLOWED = {("cli", "lab"), ("cli", "web")}
GUEST_USERS = {"agent", "cli"}
"""The test guest kit is used by these (and tests, bench); it may use the runtime below it."""
GUEST_USES = {"nbd", "block", "vm"}


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, typing_too: bool = True) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in the file; ``from a import b`` gives ``a`` and ``a.b``.
    Without ``typing_too``, imports under ``if TYPE_CHECKING:`` (never run) are left out."""

    def visit(node: ast.AST) -> Iterator[tuple[int, str]]:
        if isinstance(node, ast.If) and not typing_too:
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                for branch in node.orelse:
                    yield from visit(branch)
                return
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        for inner in ast.iter_child_nodes(node):
            yield from visit(inner)

    yield from visit(ast.parse(path.read_text()))


def _src_imports(*, typing_too: bool = True) -> Iterator[tuple[str, str | None, int, str]]:
    """(module, its package, line, imported module) for every import of a hikkoshi module in src; the
    package is ``None`` for the entry points at the top (``hikkoshi``, ``hikkoshi.__main__``)."""
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).parts
        package = parts[0] if len(parts) > 1 else None
        for line, name in _imports(path, typing_too=typing_too):
            if name.startswith("hikkoshi."):
                yield _module(path, SRC.parent), package, line, name


def _allowed(importer: str, imported: str) -> bool:
    if importer == imported:
        return True
    if imported == "guest":
        return importer in GUEST_USERS
    if importer == "guest":
        return imported in GUEST_USES
    if importer not in LAYER or imported not in LAYER:
        return False
    return LAYER[imported] < LAYER[importer] or (importer, imported) in ALSO_ALLOWED


def test_packages_import_only_layers_below() -> None:
    wrong = []
    for module, package, line, name in _src_imports():
        imported = name.split(".")[1]
        if package is not None and imported in PACKAGES and not _allowed(package, imported):
            wrong.append(f"{module}:{line} imports {name}")
    assert wrong == []


def test_no_import_cycles() -> None:
    modules = {_module(p, SRC.parent) for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, _package, _line, name in _src_imports(typing_too=False):  # a cycle is one that runs
        if name in modules and name != module:
            graph[module].add(name)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join((*path[path.index(module) :], module)))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_tests_import_helpers_only_from_support() -> None:
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        for line, name in _imports(path):
            helper = name == "tests.support" or name.startswith("tests.support.")
            if name.startswith("tests.") and not helper:
                wrong.append(f"{path.relative_to(TESTS.parent)}:{line} imports {name}")
    assert wrong == []
