"""Pure parts of the relocation proxy: presence map, bitmap header, copy plan, rates."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hikkoshi.block.bitmap_file import HEADER_SIZE, BitmapFile, BitmapHeader, BitmapMismatch
from hikkoshi.block.copy_plan import plan_copy
from hikkoshi.block.presence import PresenceMap
from hikkoshi.block.throttle import Throttle, parse_rate


@settings(max_examples=200)
@given(
    st.integers(1, 5000), st.sampled_from([512, 4096, 65536]), st.sets(st.integers(0, 10_000), max_size=200)
)
def test_presence_map_agrees_with_a_set(blocks: int, bs: int, marks: set[int]) -> None:
    size = blocks * bs - (bs // 3)
    p = PresenceMap(size, bs)
    model = set()
    for b in marks:
        if b < p.blocks:
            assert p.set(b) == (b not in model)
            model.add(b)
    assert p.present == len(model)
    assert [b for b in range(p.blocks) if p.test(b)] == sorted(model)
    runs = [b for start, n in p.missing_runs() for b in range(start, start + n)]
    assert runs == [b for b in range(p.blocks) if b not in model]
    assert p.all_present(0, size) == (len(model) == p.blocks)
    assert p.present_bytes == sum(p.block_span(b)[1] for b in model)
    again = PresenceMap(size, bs, bytes(p.bits))
    assert again.present == p.present
    for b in list(model)[:5]:
        assert p.clear(b) and not p.test(b)


def test_presence_refuses_bits_past_the_end() -> None:
    with pytest.raises(ValueError, match="past the last block"):
        PresenceMap(3 * 4096, 4096, b"\xff")


@given(st.integers(512, 1 << 20), st.integers(0, 1 << 40), st.text(max_size=50), st.booleans())
def test_bitmap_header_round_trip(bs: int, size: int, ident: str, clean: bool) -> None:
    h = BitmapHeader(bs, size, ident, clean)
    raw = h.encode()
    assert len(raw) == HEADER_SIZE and BitmapHeader.decode(raw) == h


@given(st.binary(max_size=200))
def test_bitmap_header_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(BitmapMismatch):
        BitmapHeader.decode(raw)


def test_bitmap_file_checks_what_it_describes(tmp_path: Path) -> None:
    path = tmp_path / "c.bitmap"
    bf = BitmapFile.open(path, 4096, 1 << 20, "nbd://a/x")
    bf.presence.set(3)
    bf.close()
    again = BitmapFile.open(path, 4096, 1 << 20, "nbd://a/x")
    assert again.was_clean and again.presence.test(3) and again.presence.present == 1
    # Opened and not closed cleanly: the next open knows.
    again.persist()
    import os

    os.close(again.fd)
    third = BitmapFile.open(path, 4096, 1 << 20, "nbd://a/x")
    assert not third.was_clean
    third.close()
    mismatches = [
        ((8192, 1 << 20, "nbd://a/x"), "block size"),
        ((4096, 2 << 20, "nbd://a/x"), "disk size"),
        ((4096, 1 << 20, "nbd://b/y"), "identity"),
    ]
    for args, what in mismatches:
        with pytest.raises(BitmapMismatch, match=what):
            BitmapFile.open(path, *args)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BitmapMismatch, match="checksum"):
        BitmapFile.open(path, 4096, 1 << 20, "nbd://a/x")


def test_copy_plan_orders_hot_then_used_then_rest() -> None:
    bs = 4096
    size = 100 * bs
    source = [(0, 10 * bs, 0), (10 * bs, 20 * bs, 3), (30 * bs, 70 * bs, 0)]  # blocks 10..29 are zero
    heat = [(80 * bs, 2 * bs, 7), (90 * bs, bs, 9)]
    used = [(40 * bs, 5 * bs)]
    plan = plan_copy(size, bs, source, heat=heat, fs_used=used)
    assert plan.zero == [(10, 20)]
    order = [b for s, n in plan.copy for b in range(s, s + n)]
    assert order[:3] == [90, 80, 81]  # hottest first
    assert order[3:8] == [40, 41, 42, 43, 44]  # then what the file system uses
    assert sorted(order) == [b for b in range(100) if not 10 <= b < 30]  # everything else, once
    skipping = plan_copy(size, bs, source, fs_used=used, skip_fs_free=True)
    assert [b for s, n in skipping.copy for b in range(s, s + n)] == [40, 41, 42, 43, 44]


_EXTENTS = st.tuples(st.integers(0, 70), st.integers(1, 20), st.sampled_from([0, 1, 3]))


@given(st.integers(1, 64), st.lists(_EXTENTS, max_size=8))
def test_copy_plan_covers_every_block_once(blocks: int, extents: list[tuple[int, int, int]]) -> None:
    bs = 512
    source = [(o * bs, n * bs, f) for o, n, f in extents]
    plan = plan_copy(blocks * bs, bs, source)
    copied = [b for s, n in plan.copy for b in range(s, s + n)]
    zero = [b for s, n in plan.zero for b in range(s, s + n)]
    assert len(set(copied)) == len(copied) and not set(copied) & set(zero)
    assert sorted(copied + zero) == list(range(blocks))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("100M", 100e6),
        ("100Mbit", 12.5e6),
        ("1.5G", 1.5e9),
        ("64MiB", 64 * 1024**2),
        ("500k", 500e3),
        ("10", 10),
    ],
)
def test_parse_rate(text: str, value: float) -> None:
    assert parse_rate(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "fast", "10X", "M"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


def test_throttle_never_exceeds_its_rate() -> None:
    async def main() -> float:
        t = Throttle(4e6, burst_seconds=0.05)
        start = time.monotonic()
        for _ in range(20):
            await t.take(100_000)  # 2 MB at 4 MB/s: at least ~0.45 s (a lower bound, not a timing test)
        return time.monotonic() - start

    assert asyncio.run(main()) >= 0.4
