"""The agent asks glibc for fewer malloc arenas and trims its heap after a job (Debian has glibc: the
calls must be taken)."""

from __future__ import annotations

from hikkoshi.agent.malloc_arenas import limit_arenas, trim


def test_glibc_takes_the_arena_limit() -> None:
    assert limit_arenas(2) is True


def test_freed_memory_goes_back_to_the_system() -> None:
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    # Many small blocks (below the mmap threshold: they live in the heap), then all freed but the last.
    blocks = [bytearray(4000) for _ in range(40_000)]
    for b in blocks:
        b[0] = 1
    keep = blocks[-1]
    del blocks
    before = rss_kib()
    trim()
    assert rss_kib() < before - 50_000  # most of the ~160 MB freed went back
    assert keep[0] == 1
