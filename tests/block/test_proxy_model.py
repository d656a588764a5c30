"""The relocation proxy against a model disk: random interleavings of guest I/O, flushes, background
progress, upstream outages and proxy crashes. Afterwards the cache equals the source overlaid with the
guest's writes, byte for byte.

Everything is real but in one process: our NBD server serves the source file on a Unix socket, the proxy
device talks to it through our client, and a "crash" drops the proxy without persisting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hikkoshi.block.bitmap_file import BitmapFile
from hikkoshi.block.file import RawFile
from hikkoshi.block.proxy import ProxyDevice
from hikkoshi.block.upstream import Upstream
from hikkoshi.nbd.client import Reconnect
from hikkoshi.nbd.server import Export, ExportTable, ListenAddress, NbdServer

BLOCK = 4096
BLOCKS = 48
SIZE = BLOCKS * BLOCK - 1000  # a short last block on purpose


def _source_bytes() -> bytes:
    rng = random.Random(11)
    data = bytearray(rng.randbytes(SIZE))
    data[8 * BLOCK : 16 * BLOCK] = bytes(8 * BLOCK)  # a zero region
    return bytes(data)


SOURCE = _source_bytes()


class ProxyModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="hk-proxy-model-"))
        self.src = self.dir / "src.raw"
        self.src.write_bytes(SOURCE)
        self.sock = self.dir / "up.sock"
        self.cache = self.dir / "cache.raw"
        with open(self.cache, "wb") as f:
            f.truncate(SIZE)
        self.loop = asyncio.new_event_loop()
        self.server: NbdServer | None = None
        self.server_task: asyncio.Task[None] | None = None
        self.owner: asyncio.Task[None] | None = None
        self.stop_owner: asyncio.Event | None = None
        self.proxy: ProxyDevice | None = None
        # The model: what each byte must be now, and per block which versions are acceptable after a crash.
        self.disk = bytearray(SOURCE)
        self.since_flush: list[set[bytes]] = [{self._block(b)} for b in range(BLOCKS)]
        self.run(self._start_upstream())
        self.run(self._open_proxy())

    # --- plumbing ------------------------------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 20))

    def _block(self, b: int) -> bytes:
        return bytes(self.disk[b * BLOCK : min((b + 1) * BLOCK, SIZE)])

    async def _start_upstream(self) -> None:
        exports = ExportTable()
        exports.add(Export("src", RawFile(self.src, read_only=True)))
        self.server = NbdServer(exports, [ListenAddress(unix=self.sock)])
        self.server_task = asyncio.get_running_loop().create_task(self.server.serve())
        await self.server.ready.wait()

    async def _stop_upstream(self) -> None:
        assert self.server is not None and self.server_task is not None
        self.server.stop()
        await self.server_task
        for export in self.server.exports:
            export.device.close()
        self.server = self.server_task = None

    async def _open_proxy(self) -> None:
        upstream = Upstream(
            f"nbd+unix:///src?socket={self.sock}", connections=2, reconnect=Reconnect(deadline=0.5)
        )
        await upstream.open()
        bitmap = BitmapFile.open(self.cache.with_name("cache.bitmap"), BLOCK, SIZE, "model")
        self.proxy = ProxyDevice(RawFile(self.cache), bitmap, upstream, fetch_size=4 * BLOCK)
        self.stop_owner = asyncio.Event()
        ready = asyncio.Event()

        async def own() -> None:
            async with asyncio.TaskGroup() as tg:
                assert self.proxy is not None and self.stop_owner is not None
                self.proxy.attach(tg)
                ready.set()
                await self.stop_owner.wait()

        self.owner = asyncio.get_running_loop().create_task(own())
        await ready.wait()

    async def _drop_proxy(self, crash: bool) -> None:
        proxy = self.proxy
        assert proxy is not None and self.stop_owner is not None and self.owner is not None
        if crash:
            # A process crash: nothing more reaches the bitmap file; data already written stays in the
            # page cache, as it would for a killed process.
            os.close(proxy.bitmap.fd)
            proxy.bitmap.fd = -1
            proxy.local.close()
        else:
            await proxy.flush()
            proxy.close()
        self.stop_owner.set()
        with contextlib.suppress(Exception):
            await self.owner
        await proxy.upstream.close()
        self.proxy = None

    def call(self, fn: Any) -> Any:
        """Call a device method inside the event loop (as the server does) and await it if needed."""

        async def inside() -> Any:
            result = fn()
            if asyncio.isfuture(result) or asyncio.iscoroutine(result):
                return await result
            return result

        return self.run(inside())

    # --- rules ---------------------------------------------------------------------------------------------

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(0, 3 * BLOCK))
    def read(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        assert self.proxy is not None
        try:
            data = self.call(lambda: self.proxy.read(offset, length))
        except OSError:
            assert self.server is None  # only an unreachable upstream may fail a read
            return
        assert bytes(data) == bytes(self.disk[offset : offset + length])

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * BLOCK), fill=st.integers(1, 255))
    def write(self, offset: int, length: int, fill: int) -> None:
        length = min(length, SIZE - offset)
        assert self.proxy is not None
        payload = bytes([fill]) * length
        try:
            self.call(lambda: self.proxy.write(offset, memoryview(payload), False))
        except OSError:
            assert self.server is None  # a partial block needed the upstream
            return
        self.disk[offset : offset + length] = payload
        self._touched(offset, length)

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * BLOCK), no_hole=st.booleans())
    def zero(self, offset: int, length: int, no_hole: bool) -> None:
        length = min(length, SIZE - offset)
        assert self.proxy is not None
        try:
            self.call(lambda: self.proxy.write_zeroes(offset, length, not no_hole, False, False))
        except OSError:
            assert self.server is None
            return
        self.disk[offset : offset + length] = bytes(length)
        self._touched(offset, length)

    @rule(first=st.integers(0, BLOCKS - 1), count=st.integers(1, 3))
    def trim_whole_blocks(self, first: int, count: int) -> None:
        # TRIM leaves contents unspecified in general; whole blocks of our proxy read back as zeroes.
        assert self.proxy is not None
        offset = first * BLOCK
        length = min(count * BLOCK, SIZE - offset)
        self.call(lambda: self.proxy.trim(offset, length, False))
        self.disk[offset : offset + length] = bytes(length)
        self._touched(offset, length)

    def _touched(self, offset: int, length: int) -> None:
        for b in range(offset // BLOCK, (offset + length - 1) // BLOCK + 1):
            self.since_flush[b].add(self._block(b))

    @rule()
    def flush(self) -> None:
        assert self.proxy is not None
        self.run(self.proxy.flush())
        self.since_flush = [{self._block(b)} for b in range(BLOCKS)]

    @rule(first=st.integers(0, BLOCKS - 1), count=st.integers(1, 8))
    def background(self, first: int, count: int) -> None:
        proxy = self.proxy
        assert proxy is not None
        blocks = proxy.presence.missing(first * BLOCK, min(count * BLOCK, SIZE - first * BLOCK))
        with contextlib.suppress(OSError):
            self.call(lambda: proxy.ensure(blocks, demand=False))

    @rule()
    def mark_zero_region(self) -> None:
        # What the background copy does with regions the source reports as zero.
        assert self.proxy is not None
        for b in range(8, 16):
            if self.disk[b * BLOCK : (b + 1) * BLOCK] == bytes(BLOCK) and not self.proxy.presence.test(b):
                self.proxy.mark_zero(b, 1)

    @precondition(lambda self: self.server is not None)
    @rule()
    def upstream_down(self) -> None:
        self.run(self._stop_upstream())

    @precondition(lambda self: self.server is None)
    @rule()
    def upstream_up(self) -> None:
        self.run(self._start_upstream())

    @rule(clean=st.booleans())
    def restart_proxy(self, clean: bool) -> None:
        if self.server is None:
            self.run(self._start_upstream())
        self.run(self._drop_proxy(crash=not clean))
        self.run(self._open_proxy())
        proxy = self.proxy
        assert proxy is not None
        if clean:
            return
        # After a crash every block holds some version written since the last flush (or the flushed one).
        for b in range(BLOCKS):
            off = b * BLOCK
            n = min(BLOCK, SIZE - off)
            got = bytes(self.call(lambda off=off, n=n: proxy.read(off, n)))
            assert got in self.since_flush[b], f"block {b} holds data that was never acceptable"
            self.disk[off : off + n] = got
        self.since_flush = [{self._block(b)} for b in range(BLOCKS)]

    @invariant()
    def bitmap_counts(self) -> None:
        if self.proxy is not None:
            p = self.proxy.presence
            assert p.present == sum(bin(x).count("1") for x in p.bits)

    def teardown(self) -> None:
        try:
            if self.server is None:
                self.run(self._start_upstream())
            if self.proxy is not None:
                # Finish the relocation and compare the cache file with the model, byte for byte.
                proxy = self.proxy
                self.call(lambda: proxy.ensure(list(range(BLOCKS)), demand=False))
                assert proxy.presence.complete
                self.run(proxy.flush())
                assert_same(self.cache.read_bytes(), bytes(self.disk))
                self.run(self._drop_proxy(crash=False))
            self.run(self._stop_upstream())
        finally:
            self.loop.close()
            for path in self.dir.iterdir():
                path.unlink()
            self.dir.rmdir()


def assert_same(got: bytes, want: bytes) -> None:
    """Compare disks block by block, naming the first difference (a whole-disk repr is unreadable)."""
    assert len(got) == len(want)
    for b in range(0, len(want), BLOCK):
        g, w = got[b : b + BLOCK], want[b : b + BLOCK]
        if g != w:
            at = next(i for i in range(len(w)) if g[i] != w[i])
            raise AssertionError(
                f"block {b // BLOCK} differs from byte {at}: got {g[at : at + 8]!r} want {w[at : at + 8]!r}"
            )


TestProxyModel = ProxyModel.TestCase
TestProxyModel.settings = settings(
    max_examples=int(os.environ.get("PROXY_MODEL_EXAMPLES", "40")), stateful_step_count=30, deadline=None
)
