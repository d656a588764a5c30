"""The shape of block.fs_used: its public names where their users import them, and the modules that say
they are pure import nothing that could do I/O."""

from __future__ import annotations

import ast
import importlib
import pkgutil

import pytest

import hikkoshi.block.fs_used as fs_used

PURE = [
    "hikkoshi.block.ranges",
    "hikkoshi.block.fs_used.bit_runs",
    "hikkoshi.block.fs_used.errors",
    "hikkoshi.block.fs_used.groups",
    "hikkoshi.block.fs_used.inode_tables",
    "hikkoshi.block.fs_used.superblock",
]
# What a pure module may import: computation only (no asyncio, os, logging, sockets, files).
ALLOWED = {"__future__", "bisect", "collections.abc", "dataclasses", "itertools", "re", "struct", "typing"}


def test_the_public_api_is_importable_from_the_package() -> None:
    from hikkoshi.block.fs_used import Range, ReadFn, fs_used_hint, fs_used_ranges  # noqa: F401

    for name in fs_used.__all__:
        assert getattr(fs_used, name) is not None


def test_every_module_is_described_in_the_package() -> None:
    assert fs_used.__doc__ is not None
    for info in pkgutil.iter_modules(fs_used.__path__):
        module = importlib.import_module(f"{fs_used.__name__}.{info.name}")
        assert module.__doc__, info.name
        assert f"fs_used.{info.name}`" in fs_used.__doc__, info.name


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_say_so_and_import_no_io(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__ is not None and module.__file__ is not None
    assert "Pure" in module.__doc__.split("\n\n")[0]  # in the contract's first paragraph
    with open(module.__file__) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):  # imports inside functions too
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for imported in names:
            assert imported in ALLOWED or imported in PURE, f"{name} imports {imported}"
