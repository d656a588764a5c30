"""Fewer malloc arenas for a long-running agent.

glibc gives each thread that allocates concurrently an arena of its own (up to 8 per core), and an
arena's freed pages mostly stay resident. The agent's work runs in short bursts on asyncio's thread
pool (file and process calls, timelines), so each pool thread ends up with its arena and the resident
set climbs for its first tens of migrations before it levels off (docs/BENCHMARKS.md, "Endurance").
Two arenas are plenty for an agent whose threads mostly wait; the cost is a little lock contention on
allocation, which its load never notices.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("hikkoshi.agent")

M_ARENA_MAX = -8  # glibc's malloc.h


def limit_arenas(count: int = 2) -> bool:
    """Ask glibc for at most ``count`` arenas (before threads allocate); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_ARENA_MAX, count))
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", count)
    return ok
