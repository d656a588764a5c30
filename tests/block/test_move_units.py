"""Pure and in-process tests of storage moves: dirty bitmaps, the convergence policy, the mirror layer."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import tempfile
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hikkoshi.block.dirty_bitmap import DIRTY_FLAG, DirtyBitmap
from hikkoshi.block.file import RawFile
from hikkoshi.block.mirror import MirrorDevice
from hikkoshi.block.move_journal import Journal, MoveJournalError, recover
from hikkoshi.block.move_policy import Mode, MovePolicy, PassResult, Step
from hikkoshi.block.tracking import DIRTY_CONTEXT_PREFIX, TrackedDevice

# --- dirty bitmap ------------------------------------------------------------------------------------------

ranges = st.tuples(st.integers(0, 70_000), st.integers(0, 20_000))


@given(
    size=st.integers(0, 66_000),
    shift=st.integers(9, 13),
    marks=st.lists(ranges, max_size=12),
    query=ranges,
)
def test_bitmap_matches_a_set_of_blocks(
    size: int, shift: int, marks: list[tuple[int, int]], query: tuple[int, int]
) -> None:
    g = 1 << shift
    bitmap = DirtyBitmap(size, g)

    def blocks(off: int, n: int) -> set[int]:
        end = min(off + n, size)  # bytes past the end of the disk touch nothing
        return set(range(off >> shift, ((end - 1) >> shift) + 1)) if end > off else set()

    model: set[int] = set()
    for off, n in marks:
        bitmap.mark(off, n)
        model |= blocks(off, n)
    assert bitmap.count == len(model)
    assert {b for f, c in bitmap.runs() for b in range(f, f + c)} == model
    assert all(c <= 3 for _, c in bitmap.runs(max_count=3))
    expected_bytes = sum(min(g, size - b * g) for b in model)
    assert bitmap.dirty_bytes == expected_bytes
    off, n = query
    touched = blocks(off, n)
    assert bitmap.any(off, n) == bool(touched & model)
    if touched:
        assert bitmap.all(off, n) == (touched <= model)
    # Extents tile the (clipped) range and flag exactly the dirty blocks.
    ext = bitmap.extents(off, n)
    assert sum(length for length, _ in ext) == max(0, min(off + n, size) - off)
    pos = off
    for length, flags in ext:
        assert length > 0
        for b in range(pos >> shift, ((pos + length - 1) >> shift) + 1):
            assert (b in model) == (flags == DIRTY_FLAG)
        pos += length


def test_take_returns_the_dirt_and_clears() -> None:
    bitmap = DirtyBitmap(1 << 20, 4096)
    bitmap.mark(5000, 10_000)
    taken = bitmap.take()
    assert list(taken.runs()) == [(1, 3)] and bitmap.count == 0
    bitmap.merge(taken)
    assert list(bitmap.runs()) == [(1, 3)]
    with pytest.raises(ValueError):
        bitmap.merge(DirtyBitmap(1 << 20, 8192))
    with pytest.raises(ValueError):
        DirtyBitmap(100, 1000)


# --- policy -----------------------------------------------------------------------------------------------

passes = st.lists(
    st.builds(PassResult, st.integers(0, 1 << 32), st.integers(0, 1 << 32), st.floats(0, 100)), max_size=12
)


@given(mode=st.sampled_from(Mode), history=passes, rate=st.floats(0, 1e10))
def test_policy_always_ends(mode: Mode, history: list[PassResult], rate: float) -> None:
    policy = MovePolicy()
    step = policy.next_step(mode, history, rate)
    if not history:
        assert step is Step.PASS
    elif history[-1].remaining_bytes <= policy.min_switch_bytes:
        assert step is Step.SWITCH
    if mode is Mode.MIRROR:
        assert step is not Step.FALLBACK
        if len(history) >= policy.max_mirror_passes:
            assert step is Step.SWITCH
    elif len(history) >= policy.max_passes:
        assert step in (Step.SWITCH, Step.FALLBACK)


def test_dbt_falls_back_when_passes_stop_shrinking() -> None:
    policy = MovePolicy()
    mib = 1 << 20
    shrinking = [PassResult(1000 * mib, 400 * mib, 1), PassResult(400 * mib, 100 * mib, 1)]
    assert policy.next_step(Mode.DBT, shrinking, 100 * mib) is Step.PASS
    stuck = [*shrinking, PassResult(100 * mib, 98 * mib, 1)]
    assert policy.next_step(Mode.DBT, stuck, 100 * mib) is Step.FALLBACK
    # 98 MiB at 1 GiB/s fits in 100 ms: switch instead.
    assert policy.next_step(Mode.DBT, stuck, 1024 * mib) is Step.SWITCH


# --- tracking layer ----------------------------------------------------------------------------------------


def test_tracking_marks_every_modification(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(1 << 20))
    dev = TrackedDevice(RawFile(path))
    assert dev.write(0, memoryview(b"x"), False) is None  # no bitmap yet: nothing recorded
    dev.add_bitmap("a", 4096)
    assert DIRTY_CONTEXT_PREFIX + "a" in dev.meta_contexts
    dev.write(8192, memoryview(b"y" * 10), False)
    dev.trim(65536, 4096, False)
    dev.write_zeroes(131072, 8192, True, False, False)
    assert list(dev.bitmap("a").runs()) == [(2, 1), (16, 1), (32, 2)]
    assert dev.extents(DIRTY_CONTEXT_PREFIX + "a", 0, 16384) == [(8192, 0), (4096, 1), (4096, 0)]
    assert dev.extents(DIRTY_CONTEXT_PREFIX + "gone", 0, 100) == [(100, 1)]
    for bad in ("", "a b", "x" * 65):
        with pytest.raises(ValueError):
            dev.add_bitmap(bad)
    with pytest.raises(ValueError):
        dev.add_bitmap("a")
    dev.remove_bitmap("a")
    assert dev.bitmaps == {}
    with pytest.raises(ValueError):
        dev.replace_inner(RawFile(_file(tmp_path / "small.raw", 4096)))
    dev.close()


def _file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --- journal ----------------------------------------------------------------------------------------------


def test_recovery_undoes_a_copy_and_finishes_a_switch(tmp_path: Path) -> None:
    src, dst = _file(tmp_path / "a.raw", 4096), _file(tmp_path / "b.raw", 4096)
    Journal(src, dst, "copying").write()
    assert recover(src) == src and not dst.exists() and not Journal.path_for(src).exists()
    _file(dst, 4096)
    Journal(src, dst, "switched").write()
    assert recover(src) == dst and not src.exists() and dst.exists()
    assert recover(dst) == dst  # no journal: nothing to do
    _file(src, 4096)
    dst.unlink()
    Journal(src, dst, "switched").write()
    with pytest.raises(MoveJournalError, match="missing"):
        recover(src)
    assert src.exists()  # a journal that cannot be followed deletes nothing
    Journal.path_for(src).write_text("{bad")
    with pytest.raises(MoveJournalError, match="unreadable"):
        recover(src)


# --- the mirror layer's copy --------------------------------------------------------------------------------


@pytest.mark.parametrize("refused", [False, True])
def test_copy_leaves_zero_ranges_as_holes_and_copies_data_behind_leading_zeroes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: bool
) -> None:
    g = 64 * 1024
    data = os.urandom(g)
    behind_zeroes = bytes(8192) + os.urandom(g - 8192)  # the 4 KiB probe reads zeroes: read it whole
    src_path = _file(tmp_path / "src.raw", 5 * g)
    with open(src_path, "r+b") as f:
        f.write(data + behind_zeroes + bytes(g))  # then an allocated zero block, then holes
        os.fsync(f.fileno())
    calls: list[int] = []
    real = os.copy_file_range

    def copy_file_range(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        calls.append(offset_src)
        if refused:  # as from another file system on kernels that do not copy across them
            raise OSError(errno.EXDEV, "cross-device")
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    source, dest = RawFile(src_path), RawFile(_file(tmp_path / "dst.raw", 5 * g))
    try:
        mirror = MirrorDevice(source, dest, Mode.MIRROR, g, thick=False)
        mirror.pending.mark(0, 5 * g)
        loop = asyncio.new_event_loop()
        try:
            copied, zero = loop.run_until_complete(mirror.copy_runs([(0, 1), (1, 1), (2, 1), (4, 1)]))
        finally:
            loop.close()
        assert (copied, zero) == (2 * g, 2 * g)
        assert os.pread(dest.fd, 5 * g, 0) == os.pread(source.fd, 5 * g, 0)
        assert _data_ranges(dest.fd, 5 * g) == [(0, 2 * g)]  # zeroes and holes stay holes
        assert mirror.kernel_copy is not refused
        # Only the block whose probe found data went to the kernel; after a refusal it is not asked again.
        assert calls == [0]
        assert mirror.pending.count == 1  # only the block that was not asked for
        # Ranges no longer than the probe (a dbt pass re-copying 4 KiB guest writes): read once, and an
        # all-zero one is still left a hole.
        small = MirrorDevice(source, dest, Mode.DBT, 4096, thick=False)
        os.pwrite(source.fd, bytes(4096), 0)  # allocated zeroes now
        os.pwrite(source.fd, b"\xff" * 4096, 4 * g)  # data in what was a hole
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(small.copy_runs([(0, 1), (4 * g // 4096, 1)])) == (4096, 4096)
        finally:
            loop.close()
        assert os.pread(dest.fd, 5 * g, 0) == os.pread(source.fd, 5 * g, 0)
        assert _data_ranges(dest.fd, 5 * g) == [(4096, 2 * g - 4096), (4 * g, 4096)]
        assert calls == [0]
    finally:
        source.close()
        dest.close()


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end - start))
        pos = end
    return out


# --- the mirror layer, against a model ---------------------------------------------------------------------


class SlowCopy(MirrorDevice):
    """A mirror whose copies can be made to stall between reading the source and writing the copy.

    Unstalled, copies take the real path (the kernel's copy_file_range, or the buffer when refused).
    """

    stall: threading.Event | None = None
    have_read = threading.Event()

    def _copy_io(self, offset: int, length: int) -> int:
        if self.stall is None:
            return super()._copy_io(offset, length)
        data = self._read_chunk(offset, length)
        self.have_read.set()
        self.stall.wait(0.05)  # the race's write is issued meanwhile (or waits for us: then time out)
        return self._write_chunk(offset, length, data)


G = 4096
BLOCKS = 48
SIZE = G * BLOCKS - 1000  # a short last block


class MirrorMachine(RuleBasedStateMachine):
    """Guest writes, trims, zeroes and copies (some racing each other) in any order.

    Invariant: a block neither pending nor being copied is equal in source and destination; the source
    always equals the guest's view. At the end the remainder is copied and the files are identical.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        d = Path(self.dir.name)
        self.model = bytearray(os.urandom(SIZE))
        (d / "src").write_bytes(self.model)
        _file(d / "dst", SIZE)
        self.loop = asyncio.new_event_loop()
        self.src = RawFile(d / "src")
        self.dst = RawFile(d / "dst")
        self.dev = SlowCopy(self.src, self.dst, Mode.DBT, G, thick=False)
        self.dev.pending.mark(0, SIZE)

    def _run(self, result: Any) -> Any:
        if isinstance(result, Awaitable):
            return self.loop.run_until_complete(_await(result))
        return result

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * G), fill=st.integers(0, 255))
    def write(self, off: int, n: int, fill: int) -> None:
        n = min(n, SIZE - off)
        data = bytes([fill]) * n
        self._run(self.dev.write(off, memoryview(data), False))
        self.model[off : off + n] = data

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * G), trim=st.booleans())
    def zero(self, off: int, n: int, trim: bool) -> None:
        n = min(n, SIZE - off)
        if trim:
            self._run(self.dev.trim(off, n, False))
            # TRIM leaves the contents to the device: whatever the source now reads is the truth.
            self.model[off : off + n] = os.pread(self.src.fd, n, off)
        else:
            self._run(self.dev.write_zeroes(off, n, True, False, False))
            self.model[off : off + n] = bytes(n)

    @precondition(lambda self: self.dev.pending.count > 0)
    @rule(n=st.integers(1, 4), k=st.integers(1, 3), kernel=st.booleans())
    def copy(self, n: int, k: int, kernel: bool) -> None:
        self.dev.kernel_copy = kernel
        runs = list(itertools.islice(self.dev.pending.runs(max_count=n), k))
        self._run(self.dev.copy_runs(runs))

    @precondition(lambda self: self.dev.pending.count > 0)
    @rule(data=st.data())
    def copy_racing_a_write(self, data: st.DataObject) -> None:
        runs = list(itertools.islice(self.dev.pending.runs(max_count=4), 3))
        first, count = data.draw(st.sampled_from(runs))
        off = data.draw(st.integers(first * G, min(SIZE, (first + count) * G) - 1))
        n = min(data.draw(st.integers(1, 2 * G)), SIZE - off)
        fill = data.draw(st.integers(0, 255))
        payload = bytes([fill]) * n

        async def race() -> None:
            stall = self.dev.stall = threading.Event()
            self.dev.have_read.clear()
            copy = asyncio.ensure_future(self.dev.copy_runs(runs))
            await asyncio.sleep(0)  # the copy is now in its worker thread
            assert self.dev.have_read.wait(5)  # and has read the old bytes of its first run
            result = self.dev.write(off, memoryview(payload), False)
            stall.set()
            if result is not None:
                await result
            await copy

        try:
            self.loop.run_until_complete(race())
        finally:
            self.dev.stall = None
        self.model[off : off + n] = payload

    @rule()
    def fall_back_to_mirror(self) -> None:
        self.dev.mode = Mode.MIRROR

    @invariant()
    def copied_blocks_agree(self) -> None:
        src = os.pread(self.src.fd, SIZE, 0)
        assert src == self.model
        dst = os.pread(self.dst.fd, SIZE, 0)
        for b in range(BLOCKS):
            if not self.dev.pending.test(b):
                assert src[b * G : (b + 1) * G] == dst[b * G : (b + 1) * G], f"block {b} differs"

    def teardown(self) -> None:
        try:
            while self.dev.pending.count:
                self._run(self.dev.copy_runs(list(itertools.islice(self.dev.pending.runs(max_count=8), 4))))
            assert os.pread(self.dst.fd, SIZE, 0) == self.model
        finally:
            self.src.close()
            self.dst.close()
            self.loop.close()
            self.dir.cleanup()


async def _await(x: Awaitable[Any]) -> Any:
    return await x


TestMirrorMachine = MirrorMachine.TestCase
TestMirrorMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
