"""The relocation proxy's TRIM, byte by byte against its rule: whole blocks of the range (the disk's short
last block counts when the range reaches the end) are trimmed and become present; the partial blocks at
its edges are trimmed where they are already present (each on its own), and nothing is fetched."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from hikkoshi.block.bitmap_file import BitmapFile
from hikkoshi.block.file import RawFile
from hikkoshi.block.proxy import ProxyDevice
from hikkoshi.block.upstream import Upstream
from hikkoshi.nbd.device import MaybeAwaitable

BS = 4096
BLOCKS = 6
SIZE = BLOCKS * BS - 1000  # a short last block


class RecordingFile(RawFile):
    """A cache file that remembers what was trimmed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.trimmed: set[int] = set()

    def trim(self, offset: int, length: int, fua: bool) -> MaybeAwaitable[None]:
        self.trimmed |= set(range(offset, offset + length))
        return super().trim(offset, length, fua)


@settings(max_examples=150, deadline=None)
@given(
    offset=st.integers(0, SIZE - 1),
    length=st.integers(1, 3 * BS),
    present=st.sets(st.integers(0, BLOCKS - 1)),
)
def test_trim_follows_its_rule(offset: int, length: int, present: set[int]) -> None:
    length = min(length, SIZE - offset)
    end = offset + length
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "cache.raw"
        with open(cache, "wb") as f:
            f.truncate(SIZE)
        local = RecordingFile(cache)
        bitmap = BitmapFile.open(Path(d) / "cache.bitmap", BS, SIZE, "trim")
        for b in present:
            bitmap.presence.set(b)
        proxy = ProxyDevice(local, bitmap, Upstream("nbd://127.0.0.1:1/none"))
        try:
            assert proxy.trim(offset, length, False) is None  # nothing in flight: done at once
            trimmed = local.trimmed
            now_present = {b for b in range(BLOCKS) if proxy.presence.test(b)}
        finally:
            proxy.close()

    def block_bytes(b: int) -> set[int]:
        return set(range(b * BS, min((b + 1) * BS, SIZE)))

    whole = {b for b in range(BLOCKS) if block_bytes(b) <= set(range(offset, end))}
    whole_bytes = set().union(*(block_bytes(b) for b in whole))
    # What is left are the partial blocks at the edges (two at most); each is trimmed if present.
    expected = set(whole_bytes)
    for b in {offset // BS, (end - 1) // BS} - whole:
        if b in present:
            expected |= block_bytes(b) & set(range(offset, end))
    assert trimmed == expected
    assert now_present == present | whole
