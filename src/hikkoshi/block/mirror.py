"""The mirror layer of a storage move: the export's device while its disk is copied to another file.

Reads come from the source. ``pending`` holds the blocks whose destination copy is not known to be
current; the copier (:meth:`copy_runs`) clears the bits of a few runs, then copies them in one worker
thread call (one hop per job, not per run: under a guest's write load every hop waits for the busy event
loop and the GIL). A data chunk is copied by the kernel (``copy_file_range``), never read into Python,
unless its first bytes are zero: only then is it read, to find out whether all of it is.

The invariant: a block that is neither pending nor being copied is equal on both sides.

- ``dbt``: a write marks its blocks pending *before* it reaches the source, so a copy that races with it
  is redone; the destination is never written by the guest.
- ``mirror``: a write reaches the source, then, unless all its blocks are pending anyway, the
  destination, before it is acknowledged; a write to a chunk being copied waits for that copy first, so
  fetched-before-the-write bytes can never land after it. Both writes happen in the event loop, one
  after the other, so two overlapping guest writes reach both files in the same order.
- TRIM and WRITE_ZEROES (and writes whose source device answers asynchronously) only mark pending: what
  the source then reads as is copied, as holes.

A destination write that fails (say the destination is full) is not the guest's problem: the source has
the data; the blocks are marked pending and :attr:`failure` makes the move give up.

:meth:`hold` makes every modifying request (and FLUSH) wait; :meth:`release` lets them go, either to the
destination (after the switch) or the source (after an abort).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Sequence
from typing import Literal

from hikkoshi.block import fallocate
from hikkoshi.block.dirty_bitmap import DirtyBitmap
from hikkoshi.block.file import RawFile
from hikkoshi.block.move_policy import Mode
from hikkoshi.block.tracking import then
from hikkoshi.nbd.device import BlockDevice, Buffer, MaybeAwaitable

Target = Literal["both", "source", "dest"]

#: A chunk whose first this-many bytes are not all zero is data; only chunks that start with zeroes are
#: read whole to see whether they are all zero (and then left as holes).
_PROBE = 4096
_PROBE_ZEROES = bytes(_PROBE)
#: copy_file_range refusing this pair of files (another file system, an old kernel): copy through a buffer.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class MirrorDevice(BlockDevice):
    """Source plus destination, kept converging."""

    def __init__(self, source: BlockDevice, dest: RawFile, mode: Mode, granularity: int, thick: bool) -> None:
        if source.read_fd() < 0:
            raise ValueError("only an export served from a file can be moved")
        self.source = source
        self.dest = dest
        self.size = source.size
        self.capabilities = source.capabilities
        self.meta_contexts = source.meta_contexts
        self.mode = mode
        self.thick = thick
        self.pending = DirtyBitmap(source.size, granularity)
        #: The first destination error; the move fails with it.
        self.failure: OSError | None = None
        #: Where held and later requests go: both sides while moving, one after switch or abort.
        self.target: Target = "both"
        # Jobs being copied: (first byte, end of the last range, byte ranges (offset, length), done).
        self._busy: list[tuple[int, int, list[tuple[int, int]], asyncio.Future[None]]] = []
        #: Whether copy_file_range works between these files; learned on first use.
        self.kernel_copy = True
        self._held: asyncio.Event | None = None
        self._source_ops = 0  # asynchronous source requests in flight (flushes): the source stays open
        self._source_idle = asyncio.Event()
        self._source_idle.set()
        self._io: set[asyncio.Future[tuple[int, int]]] = set()  # copies running in worker threads

    # --- holding ------------------------------------------------------------------------------------------

    def hold(self) -> None:
        """Modifying requests from now on wait until :meth:`release`."""
        if self._held is None:
            self._held = asyncio.Event()

    def release(self, target: Target) -> None:
        """Let held requests go, to ``target`` from now on."""
        self.target = target
        if self._held is not None:
            self._held.set()
            self._held = None

    async def _when_released(self) -> None:
        while self._held is not None:
            await self._held.wait()

    async def source_drained(self) -> None:
        """Wait until no request runs on the source (before it is closed)."""
        await self._source_idle.wait()

    # --- requests -----------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> MaybeAwaitable[Buffer]:
        return (self.dest if self.target == "dest" else self.source).read(offset, length)

    def read_fd(self) -> int:
        return (self.dest if self.target == "dest" else self.source).read_fd()

    def _busy_overlap(self, offset: int, end: int) -> list[asyncio.Future[None]]:
        return [
            f
            for (s, e, ranges, f) in self._busy
            if s < end and offset < e and any(a < end and offset < a + n for a, n in ranges)
        ]

    def write(self, offset: int, data: memoryview, fua: bool) -> MaybeAwaitable[None]:
        if self._held is None:
            if self.target != "both":
                return self._only(self.target).write(offset, data, fua)
            if not (
                self.mode is Mode.MIRROR and self._busy and self._busy_overlap(offset, offset + len(data))
            ):
                return self._write_both(offset, data, fua)
        return self._write_later(offset, bytes(data), fua)

    async def _write_later(self, offset: int, data: bytes, fua: bool) -> None:
        while True:
            await self._when_released()
            waits = self._busy_overlap(offset, offset + len(data)) if self.mode is Mode.MIRROR else []
            if not waits:
                break
            await asyncio.gather(*waits)
        result = self.write(offset, memoryview(data), fua)
        if result is not None:
            await result

    def _write_both(self, offset: int, data: memoryview, fua: bool) -> MaybeAwaitable[None]:
        length = len(data)
        if self.mode is Mode.DBT:
            self.pending.mark(offset, length)
            return self._marked_after(self.source.write(offset, data, fua), offset, length)
        result = self.source.write(offset, data, fua)
        if result is not None:
            # The destination write would come later than the source's, maybe after an overlapping one.
            self.pending.mark(offset, length)
            return self._marked_after(result, offset, length)
        if self.failure is None and not self.pending.all(offset, length):
            try:
                self.dest.write(offset, data, False)
            except OSError as exc:
                self.failure = exc
                self.pending.mark(offset, length)
        return None

    def _marked_after(self, result: MaybeAwaitable[None], offset: int, length: int) -> MaybeAwaitable[None]:
        if result is None:
            return None
        return then(result, lambda: self.pending.mark(offset, length))

    def _only(self, target: Target) -> BlockDevice:
        return self.dest if target == "dest" else self.source

    def _modify(self, offset: int, length: int, call: str, *args: object) -> MaybeAwaitable[None]:
        """TRIM or WRITE_ZEROES: done on the source, the destination catches up by copying."""
        if self._held is not None:
            return self._modify_later(offset, length, call, *args)
        if self.target != "both":
            return getattr(self._only(self.target), call)(offset, length, *args)  # type: ignore[no-any-return]
        self.pending.mark(offset, length)
        result: MaybeAwaitable[None] = getattr(self.source, call)(offset, length, *args)
        return self._marked_after(result, offset, length)

    async def _modify_later(self, offset: int, length: int, call: str, *args: object) -> None:
        await self._when_released()
        result = self._modify(offset, length, call, *args)
        if result is not None:
            await result

    def trim(self, offset: int, length: int, fua: bool) -> MaybeAwaitable[None]:
        return self._modify(offset, length, "trim", fua)

    def write_zeroes(
        self, offset: int, length: int, may_trim: bool, fast_only: bool, fua: bool
    ) -> MaybeAwaitable[None]:
        return self._modify(offset, length, "write_zeroes", may_trim, fast_only, fua)

    def flush(self) -> Awaitable[None]:
        return self._flush()

    async def _flush(self) -> None:
        await self._when_released()
        if self.target == "dest":
            await self.dest.flush()
            return
        # Until the switch the source is the disk; the destination is flushed as part of switching.
        self._source_ops += 1
        self._source_idle.clear()
        try:
            await self.source.flush()
        finally:
            self._source_ops -= 1
            if not self._source_ops:
                self._source_idle.set()

    def cache(self, offset: int, length: int) -> MaybeAwaitable[None]:
        return self._only("dest" if self.target == "dest" else "source").cache(offset, length)

    def extents(self, context: str, offset: int, length: int) -> MaybeAwaitable[list[tuple[int, int]]]:
        return self._only("dest" if self.target == "dest" else "source").extents(context, offset, length)

    # --- copying ------------------------------------------------------------------------------------------

    async def copy_runs(self, runs: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """Copy block runs (first, count), in disk order, to the destination in one worker thread call.

        Returns (bytes copied, bytes found all zero and left as holes or zeroed extents).
        """
        shift = self.pending.shift
        ranges = [(f << shift, min(c << shift, self.size - (f << shift))) for f, c in runs]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        entry = (ranges[0][0], ranges[-1][0] + ranges[-1][1], ranges, done)
        self._busy.append(entry)
        for first, count in runs:
            self.pending.clear_blocks(first, count)
        io = loop.run_in_executor(None, self._copy_job, ranges)
        self._io.add(io)
        io.add_done_callback(self._io.discard)
        try:
            # A thread cannot be cancelled: on cancellation it runs on, and quiesce() waits for it.
            return await asyncio.shield(io)
        except BaseException:
            for first, count in runs:
                self.pending.mark_blocks(first, count)
            raise
        finally:
            self._busy.remove(entry)
            done.set_result(None)

    async def quiesce(self) -> None:
        """Wait until no copy runs in a worker thread (before the files are closed)."""
        while self._io:
            await asyncio.wait(list(self._io))

    def _copy_job(self, ranges: list[tuple[int, int]]) -> tuple[int, int]:
        """In a worker thread: copy byte ranges; (bytes copied, bytes zero)."""
        copied = zero = 0
        for offset, length in ranges:
            n = self._copy_io(offset, length)
            copied += n
            zero += length - n
        # Disk writes start now, in the background, rather than all at once in the switch's fsync.
        first, end = ranges[0][0], ranges[-1][0] + ranges[-1][1]
        fallocate.start_writeback(self.dest.fd, first, end - first)
        return copied, zero

    def _copy_io(self, offset: int, length: int) -> int:
        """One range, holes and zeroes left as holes (or zeroed extents when thick); bytes copied."""
        src = self.source.read_fd()
        # Data (nearly every range a pass copies) costs two system calls; holes are found by reading.
        head = os.pread(src, min(_PROBE, length), offset)
        if len(head) == length:
            # A small range (a guest's 4 KiB write, re-copied by dbt) is all read already.
            return self._write_chunk(offset, length, None if head == _PROBE_ZEROES[:length] else head)
        if head != _PROBE_ZEROES[: len(head)] and self.kernel_copy and self._kernel_copy(src, offset, length):
            return length
        return self._write_chunk(offset, length, self._read_chunk(offset, length))

    def _kernel_copy(self, src: int, offset: int, length: int) -> bool:
        """Copy a range of data with copy_file_range; False (nothing copied) if it cannot be used here."""
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src, self.dest.fd, length - done, offset + done, offset + done)
                if n <= 0:
                    break  # past the end of a file that shrank: the buffered copy zero-fills the rest
                done += n
        except OSError as exc:
            if done or exc.errno not in _NO_KERNEL_COPY:
                raise
            self.kernel_copy = False
            return False
        if done < length:
            self._write_chunk(offset + done, length - done, self._read_chunk(offset + done, length - done))
        return True

    def _read_chunk(self, offset: int, length: int) -> bytearray | None:
        """The source's bytes, or None when they are all zero."""
        src = self.source.read_fd()
        if _is_hole(src, offset, length):
            return None
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = os.preadv(src, [view[got:]], offset + got)
            if n <= 0:
                break  # past the end of a file that shrank: the rest stays zero
            got += n
        return None if buf == bytes(length) else buf

    def _write_chunk(self, offset: int, length: int, data: bytes | bytearray | None) -> int:
        if data is None:
            self._zero_dest(offset, length)
            return 0
        view = memoryview(data)
        put = 0
        while put < length:
            put += os.pwritev(self.dest.fd, [view[put:]], offset + put)
        return length

    def _zero_dest(self, offset: int, length: int) -> None:
        fd = self.dest.fd
        try:
            if self.thick:
                fallocate.zero_range(fd, offset, length)
            else:
                fallocate.punch_hole(fd, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        os.pwrite(fd, bytes(length), offset)


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """Whether the whole range is a hole in the file (SEEK_DATA finds no data in it)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data after offset at all
