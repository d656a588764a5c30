"""Fewer malloc arenas for a long-running agent.

glibc gives each thread that allocates concurrently an arena of its own (up to 8 per core), and an
arena's freed pages mostly stay resident. The agent's work runs in short bursts on asyncio's thread
pool (file and process calls, timelines), so each pool thread ends up with its arena and the resident
set climbs for its first tens of migrations before it levels off (docs/BENCHMARKS.md, "Endurance").
Two arenas are plenty for an agent whose threads mostly wait; the cost is a little lock contention on
allocation, which its load never notices.

Large blocks are mapped on their own, always: a migration carries the VM's home files (kernel and
initrd among them, tens of MiB) in memory on both sides, and glibc's dynamic threshold, raised by the
first such block freed, put the next ones on the heap, where freed pages stay resident; the agent's
RSS then swung by the size of a home from one move to the next (docs/BENCHMARKS.md, "Endurance").
After each migration job the agent also hands the heap's free pages back (:func:`trim`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("hikkoshi.agent")

M_ARENA_MAX = -8  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
"""Blocks from this size up get their own mapping, given back when freed (fixed: never raised)."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (``find_library`` runs ``ldconfig``: not for every job's trim)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def limit_arenas(count: int = 2) -> bool:
    """Ask glibc for at most ``count`` arenas (before threads allocate) and a fixed mmap threshold;
    False where there is no glibc (or it refused)."""
    libc = _libc()
    if libc is None:
        return False
    try:
        ok = bool(libc.mallopt(M_ARENA_MAX, count))
    except AttributeError:
        return False
    if not ok:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", count)
    if not libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", MMAP_THRESHOLD)
        ok = False
    return ok


def trim() -> bool:
    """``malloc_trim(0)``: free heap pages go back to the system; False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False
