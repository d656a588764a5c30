"""Our asyncio client against real servers: ours, qemu-nbd, nbdkit (one of them answering out of order)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hikkoshi.nbd.client import NbdClient, Reconnect, list_exports
from hikkoshi.nbd.constants import Errno
from hikkoshi.nbd.errors import CommandError, OptionError
from tests.support.images import make_image
from tests.support.servers import (
    Served,
    free_port,
    hikkoshi_server,
    peer_server,
    shuffling_server,
    stop,
    wait_port,
)


@pytest.fixture(params=["hikkoshi", "qemu-nbd", "nbdkit"])
def any_server(request: pytest.FixtureRequest, image: Path) -> Iterator[Served]:
    if request.param == "hikkoshi":
        with hikkoshi_server(str(image), "--export", "") as s:
            yield s
    else:
        with peer_server(request.param, image) as s:
            yield s


async def exercise(uri: str, file: bytes) -> None:
    async with NbdClient(uri) as c:
        assert c.size == len(file)
        # Many reads in flight at once, answered by handle.
        rng = random.Random(3)
        spans = [(rng.randrange(0, c.size - 70_000), rng.randrange(1, 70_000)) for _ in range(200)]
        got = await asyncio.gather(*(c.read(o, n) for o, n in spans))
        for (o, n), data in zip(spans, got, strict=True):
            assert data == file[o : o + n]
        # Writes, then reads back, unaligned too.
        await asyncio.gather(*(c.write(o, bytes([o % 251]) * 777) for o in range(3, 200_000, 10_007)))
        for o in range(3, 200_000, 10_007):
            assert await c.read(o, 777) == bytes([o % 251]) * 777
        await c.flush()
        # A read larger than one request: split and reassembled.
        big = await c.read(0, 40 << 20)
        assert hashlib.sha256(big[300_000:]).digest() == hashlib.sha256(file[300_000 : 40 << 20]).digest()
        await c.write_zeroes(8 << 20, 1 << 20)
        assert await c.read(8 << 20, 1 << 20) == bytes(1 << 20)
        await c.trim(12 << 20, 1 << 20)
        await c.cache(0, 1 << 20)
        extents = await c.block_status(0, 16 << 20)
        assert sum(n for n, _ in extents) >= 1 and extents[0][0] > 0
        # Data at 0 (the image has 1 MiB of data every 4 MiB), and holes report HOLE|ZERO.
        assert extents[0][1] & 1 == 0
        with pytest.raises(CommandError) as err:
            await c.read(c.size - 10, 20)
        assert err.value.errno == Errno.EINVAL
        await c.flush()


def test_against_servers(any_server: Served, image: Path) -> None:
    asyncio.run(exercise(any_server.uri, image.read_bytes()))
    # What the client wrote reached the file.
    after = image.read_bytes()
    assert after[3 : 3 + 777] == bytes([3]) * 777
    assert after[8 << 20 : 9 << 20] == bytes(1 << 20)


def test_out_of_order_server(tmp_path: Path) -> None:
    """A server answering 32 parallel reads in random order: every byte lands where it belongs."""
    image = tmp_path / "src.raw"
    data = random.Random(5).randbytes(4 << 20)
    image.write_bytes(data)
    with shuffling_server(image) as s:

        async def main() -> None:
            async with NbdClient(s.uri) as c:
                blocks = list(range(0, 4 << 20, 64 << 10))
                random.Random(1).shuffle(blocks)
                got = await asyncio.gather(*(c.read(b, 64 << 10) for b in blocks))
                bad = [b for b, d in zip(blocks, got, strict=True) if d != data[b : b + (64 << 10)]]
                assert bad == []

        asyncio.run(main())


def test_list_exports_and_unknown(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.raw", 1 << 20)
    b = make_image(tmp_path / "b.raw", 2 << 20, seed=2)
    with hikkoshi_server(str(a), str(b), "--export", "first", "--export", "second") as s:

        async def main() -> None:
            names = [e.name for e in await list_exports(s.uri)]
            assert names == ["first", "second"]
            async with NbdClient(s.export_uri("second")) as c:
                assert c.size == 2 << 20
            with pytest.raises(OptionError):
                async with NbdClient(s.export_uri("third")):
                    pass

        asyncio.run(main())


def _serve_on(port: int, image: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hikkoshi", "nbd", "serve", str(image), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_port(port)
    return proc


def test_reconnect_after_server_restart(image: Path) -> None:
    port = free_port()
    file = image.read_bytes()
    proc = _serve_on(port, image)
    procs = [proc]
    try:

        async def main() -> None:
            async with NbdClient(f"nbd://127.0.0.1:{port}/", reconnect=Reconnect(deadline=30)) as c:
                assert await c.read(0, 4096) == file[:4096]
                await c.write(4096, b"w" * 4096)
                stop(procs[0], signal.SIGKILL)
                # The write was acknowledged but never flushed, and the server died: flush must say so.
                reading = asyncio.create_task(c.read(1 << 20, 4096))
                await asyncio.sleep(0.3)
                assert not reading.done()  # waiting for the server, not failing
                procs.append(_serve_on(port, image))
                assert await reading == file[1 << 20 : (1 << 20) + 4096]
                assert c.reconnects == 1
                with pytest.raises(CommandError) as err:
                    await c.flush()
                assert err.value.errno == Errno.EIO
                await c.write(8192, b"v" * 10)
                await c.flush()  # a new write, flushed on the new connection: fine

        asyncio.run(main())
    finally:
        for p in procs:
            stop(p)


def test_reconnect_deadline_gives_eio(image: Path) -> None:
    port = free_port()
    proc = _serve_on(port, image)
    try:

        async def main() -> None:
            async with NbdClient(f"nbd://127.0.0.1:{port}/", reconnect=Reconnect(deadline=1.0)) as c:
                await c.read(0, 512)
                stop(proc, signal.SIGKILL)
                with pytest.raises(CommandError) as err:
                    await c.read(0, 512)
                assert err.value.errno == Errno.EIO

        asyncio.run(main())
    finally:
        stop(proc)


def test_no_reconnect_fails_fast(image: Path) -> None:
    port = free_port()
    proc = _serve_on(port, image)
    try:

        async def main() -> None:
            async with NbdClient(f"nbd://127.0.0.1:{port}/") as c:
                await c.read(0, 512)
                stop(proc, signal.SIGKILL)
                with pytest.raises(ConnectionError):
                    await c.read(0, 512)

        asyncio.run(main())
    finally:
        stop(proc)
