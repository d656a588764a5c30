"""Disk images for tests: sparse files with pseudo-random data where a test wants it."""

from __future__ import annotations

import random
from pathlib import Path


def make_image(path: Path, size: int, seed: int = 1, data_every: int = 4 << 20) -> Path:
    """A sparse raw image with 1 MiB of pseudo-random data every ``data_every`` bytes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, data_every):
            f.seek(off)
            f.write(rng.randbytes(min(1 << 20, size - off)))
    return path


def random_image(path: Path, size: int, seed: int = 3, zero_every: int = 0) -> bytes:
    """Random data; with ``zero_every``, the first half of every such span is a hole (sparse, reads zero)."""
    data = bytearray(random.Random(seed).randbytes(size))
    if not zero_every:
        path.write_bytes(data)
        return bytes(data)
    with path.open("wb") as f:
        f.truncate(size)
        for off in range(0, size, zero_every):
            half = min(zero_every // 2, size - off)
            data[off : off + half] = bytes(half)
            f.seek(off + half)
            f.write(data[off + half : off + zero_every])
    return bytes(data)
