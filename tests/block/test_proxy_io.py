"""The proxy's fetch path in pieces: reused fetch buffers, the cache writer thread, and replies received
straight into a read's buffer."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from hikkoshi.block.bitmap_file import BitmapFile
from hikkoshi.block.buffers import BufferPool
from hikkoshi.block.cache_writer import CacheWriter, Punch, Write
from hikkoshi.block.file import RawFile
from hikkoshi.block.proxy import ProxyDevice
from hikkoshi.block.upstream import Upstream
from hikkoshi.lab.link_model import WanParams
from hikkoshi.lab.wan import WanLink
from hikkoshi.nbd import wire
from hikkoshi.nbd.client_transmission import ClientTransmission
from hikkoshi.nbd.constants import Command, ReplyFlag
from hikkoshi.nbd.device import Buffer, MaybeAwaitable
from hikkoshi.nbd.server import Export, ExportTable, ListenAddress, NbdServer


def test_buffer_pool_reuses_only_unreferenced_buffers() -> None:
    pool = BufferPool(64, keep=2)
    a = pool.take()
    view = memoryview(a)[8:16]  # e.g. a reply still waiting in a transport
    a_id = id(a)
    del a
    b = pool.take()
    assert id(b) != a_id  # the view still refers to the first buffer
    b_id = id(b)
    del b
    assert id(pool.take()) == b_id  # nothing refers to the second one any more
    view.release()
    assert id(pool.take()) in (a_id, b_id)
    # Past ``keep`` buffers in use, fresh ones are made and not kept.
    held = [pool.take() for _ in range(4)]
    assert len({id(h) for h in held}) == 4


def test_cache_writer_joins_writes_and_punches_in_order(tmp_path: Path) -> None:
    path = tmp_path / "cache.raw"
    path.write_bytes(b"\xff" * (1 << 20))
    fd = os.open(path, os.O_RDWR)
    writer = CacheWriter(fd)
    chunks = [bytes([i + 1]) * 4096 for i in range(8)]

    async def main() -> None:
        # Consecutive jobs continue each other (joined into one pwritev); a punch comes in between.
        futs = [writer.write([Write(i * 4096, memoryview(c))]) for i, c in enumerate(chunks)]
        futs.append(writer.write([Punch(65536, 8192), Write(131072, memoryview(b"x" * 100))]))
        writer.prefault(0, 1 << 20)
        await asyncio.gather(*futs)

    try:
        asyncio.run(main())
    finally:
        writer.close()
        os.close(fd)
    data = path.read_bytes()
    assert data[: 8 * 4096] == b"".join(chunks)
    assert data[65536 : 65536 + 8192] == bytes(8192)
    assert data[131072 : 131072 + 100] == b"x" * 100
    assert data[131172:131200] == b"\xff" * 28


def test_cache_writer_reports_failures(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "ro.raw", os.O_RDONLY | os.O_CREAT)
    writer = CacheWriter(fd)

    async def main() -> None:
        with pytest.raises(OSError):
            await writer.write([Write(0, memoryview(b"abc"))])

    try:
        asyncio.run(main())
    finally:
        writer.close()
        os.close(fd)


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_read_reply_received_in_place(structured: bool, seed: int) -> None:
    """Reads answered in random splits through get_buffer/buffer_updated, into a buffer of the caller's."""
    rng = random.Random(seed)
    disk = rng.randbytes(1 << 18)
    m = ClientTransmission(structured=structured)
    target = bytearray(b"?" * 100_000)
    h1, _ = m.request(Command.READ, 5000, 100_000, into=target)
    h2, _ = m.request(Command.READ, 0, 300)
    h3, _ = m.request(Command.FLUSH, 0, 0)
    stream = bytearray()
    if structured:
        stream += wire.encode_chunk(0, h1, wire.OffsetData(55_000, disk[55_000:105_000]))
        stream += wire.encode_chunk(ReplyFlag.DONE, h2, wire.OffsetData(0, disk[:300]))
        stream += wire.encode_chunk(ReplyFlag.DONE, h1, wire.OffsetData(5000, disk[5000:55_000]))
    else:
        stream += wire.encode_simple_reply(wire.SimpleReply(0, h1)) + disk[5000:105_000]
        stream += wire.encode_simple_reply(wire.SimpleReply(0, h2)) + disk[:300]
    stream += wire.encode_simple_reply(wire.SimpleReply(0, h3))
    replies = {}
    pos = 0
    while pos < len(stream):
        buf = m.get_buffer(-1)
        n = min(len(buf), rng.randrange(1, 40_000), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        m.buffer_updated(n)
        pos += n
        while (reply := m.next_reply()) is not None:
            replies[reply.handle] = reply
    assert replies[h1].data is target and bytes(target) == disk[5000:105_000]
    assert bytes(replies[h2].data or b"") == disk[:300]
    assert replies[h3].error == 0
    assert not m.pending


class _SlowSource(RawFile):
    """A source file whose reads take a while: a fetch stays in flight long enough to be joined."""

    def read(self, offset: int, length: int) -> MaybeAwaitable[Buffer]:  # type: ignore[override]
        async def later() -> Buffer:
            await asyncio.sleep(0.3)
            return RawFile.read(self, offset, length)

        return later()


def test_a_cancelled_reader_does_not_cancel_a_shared_fetch(tmp_path: Path) -> None:
    """Two reads join one fetch; the first is cancelled (its client left). The fetch completes for the
    second, and the proxy's task group lives on (a cancelled shared future used to crash it)."""
    block = 64 << 10
    size = 16 * block
    source_data = random.Random(7).randbytes(size)
    (tmp_path / "src.raw").write_bytes(source_data)
    sock = tmp_path / "src.sock"

    async def scenario() -> None:
        exports = ExportTable()
        exports.add(Export("src", _SlowSource(tmp_path / "src.raw", read_only=True)))
        server = NbdServer(exports, [ListenAddress(unix=sock)])
        async with asyncio.TaskGroup() as outer:
            outer.create_task(server.serve())
            await server.ready.wait()
            upstream = Upstream(f"nbd+unix:///src?socket={sock}", connections=1)
            await upstream.open()
            bitmap = BitmapFile.open(tmp_path / "cache.bitmap", block, size, "test")
            (tmp_path / "cache.raw").write_bytes(b"")
            os.truncate(tmp_path / "cache.raw", size)
            proxy = ProxyDevice(RawFile(tmp_path / "cache.raw"), bitmap, upstream)
            async with asyncio.TaskGroup() as tg:
                proxy.attach(tg)
                first = asyncio.ensure_future(proxy.read(0, block))  # type: ignore[arg-type]
                await asyncio.sleep(0.05)
                second = asyncio.ensure_future(proxy.read(0, 2 * block))  # type: ignore[arg-type]
                await asyncio.sleep(0.05)
                first.cancel()
                assert bytes(await second) == source_data[: 2 * block]
                with pytest.raises(asyncio.CancelledError):
                    await first
                # Later reads of the same blocks come from the cache, and new fetches still work.
                # (served at once from the cache once the cache writer has marked them present, else
                # through a short wait for that write: either way the same bytes)
                again = proxy.read(0, block)
                cached = again if isinstance(again, bytes | bytearray | memoryview) else await again
                assert bytes(cached) == source_data[:block]
                tail = proxy.read(size - block, block)
                assert not isinstance(tail, (bytes, bytearray, memoryview))
                assert bytes(await tail) == source_data[-block:]
            await upstream.close()
            proxy.close()
            server.stop()

    asyncio.run(scenario())


def test_upstream_opens_its_connections_in_one_round_trip(tmp_path: Path) -> None:
    """Across a slow link the upstream's connections are negotiated together, each in one round trip
    after the greeting (options pipelined): two round trips in all (the link models TCP's own
    handshake), where one connection after another, or an option at a time, took twice that or more."""
    one_way = 0.25
    (tmp_path / "src.raw").write_bytes(bytes(1 << 20))

    async def scenario() -> None:
        exports = ExportTable()
        exports.add(Export("src", RawFile(tmp_path / "src.raw")))
        server = NbdServer(exports, [ListenAddress(host="127.0.0.1", port=0)])
        async with asyncio.TaskGroup() as outer:
            outer.create_task(server.serve())
            await server.ready.wait()
            async with WanLink(WanParams(one_way * 1000), server.bound[0]) as link:
                upstream = Upstream(f"nbd://127.0.0.1:{link.port}/src", connections=4)
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                await upstream.open()
                took = loop.time() - t0
                try:
                    assert len(upstream.clients) == 4  # our server allows multi-conn
                    assert upstream.size == 1 << 20
                    # TCP's handshake, the greeting and one round trip for every option: 4 one-way
                    # delays measured; 2 more are slack for a busy machine. One connection after
                    # another took 8, an option at a time 16.
                    assert took < 6 * one_way, took
                finally:
                    await upstream.close()
            server.stop()

    asyncio.run(scenario())
