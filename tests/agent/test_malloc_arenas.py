"""The agent asks glibc for fewer malloc arenas (Debian has glibc: the call must be taken)."""

from __future__ import annotations

from hikkoshi.agent.malloc_arenas import limit_arenas


def test_glibc_takes_the_arena_limit() -> None:
    assert limit_arenas(2) is True
