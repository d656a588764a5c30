"""`hikkoshi nbd proxy` as users run it: the xNBD failure cases, outages, crashes, a guest on top.

xNBD, the original implementation of seed 004, was seen to: corrupt 15,680 of 16,384 blocks in a parallel
cold read from an upstream that answers out of order; abort on one 512 KiB read over a cache with every
other 4 KiB block present, and after restart serve 32 blocks as zeros; abort a session on TRIM; listen on
all interfaces. Each has a test here.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.block.file import RawFile
from hikkoshi.lab.link_model import WanParams
from hikkoshi.lab.wan import WanLink
from hikkoshi.nbd.client import NbdClient
from hikkoshi.nbd.constants import Errno
from hikkoshi.nbd.errors import CommandError
from hikkoshi.nbd.server import Export, ExportTable, ListenAddress, NbdServer
from tests.support.images import random_image
from tests.support.proxies import proxy, proxy_args, status, wait_detached
from tests.support.servers import (
    free_port,
    hikkoshi_server,
    run_tool,
    shuffling_server,
    stop,
    wait_port,
)


def test_parallel_cold_read_from_out_of_order_upstream(tmp_path: Path) -> None:
    """16,384 blocks of 4 KiB read cold, 64 at a time, from an upstream answering in random order."""
    src = tmp_path / "src.raw"
    data = random_image(src, 16384 * 4096)
    with (
        shuffling_server(src, max_delay_ms=10) as up,
        proxy(up.uri, tmp_path, "--no-background", "--block-size", "4K") as p,
    ):

        async def main() -> list[int]:
            async with NbdClient(p.uri) as c:
                order = list(range(16384))
                random.Random(9).shuffle(order)
                bad: list[int] = []
                for i in range(0, len(order), 64):
                    batch = order[i : i + 64]
                    got = await asyncio.gather(*(c.read(b * 4096, 4096) for b in batch))
                    bad += [
                        b for b, d in zip(batch, got, strict=True) if d != data[b * 4096 : (b + 1) * 4096]
                    ]
                return bad

        assert asyncio.run(main()) == []
        assert status(tmp_path)["upstream"] == "detached"  # every block fetched: the source is released
    assert (tmp_path / "cache.raw").read_bytes() == data


def test_big_read_over_half_present_cache_then_crash(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = random_image(src, 8 << 20)
    with hikkoshi_server(str(src), "--export", "src") as up:
        uri = up.export_uri("src")
        with proxy(uri, tmp_path, "--no-background", "--block-size", "4K") as p:

            async def half() -> None:
                async with NbdClient(p.uri) as c:
                    for b in range(0, 512 << 10, 8192):  # every other 4 KiB block of the first 512 KiB
                        assert await c.read(b, 4096) == data[b : b + 4096]
                    await c.flush()
                    assert await c.read(0, 512 << 10) == data[: 512 << 10]  # one read over the patchwork

            asyncio.run(half())
            stop(p.proc, signal.SIGKILL)  # a crash: no clean shutdown, no final flush
        with proxy(uri, tmp_path, "--no-background", "--block-size", "4K") as p:

            async def whole() -> bytes:
                async with NbdClient(p.uri) as c:
                    return await c.read(0, 8 << 20)

            assert asyncio.run(whole()) == data  # nothing served as zeros after the restart


def test_trim_and_zeroes_keep_the_session(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = random_image(src, 4 << 20)
    with (
        hikkoshi_server(str(src), "--export", "src") as up,
        proxy(up.export_uri("src"), tmp_path, "--no-background") as p,
    ):
        script = [
            "discard 0 1M",
            "read -P 0 0 1M",
            "write -z 2M 64k",
            "read -P 0 2M 64k",
            "write -P 0x5a 1500 3000",
        ]
        args = ["qemu-io", "-f", "raw", p.uri]
        for cmd in script:
            args += ["-c", cmd]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, (
            out.stdout + out.stderr
        )

        async def check() -> None:
            async with NbdClient(p.uri) as c:
                assert await c.read(1 << 20, 1 << 20) == data[1 << 20 : 2 << 20]  # untouched, fetched
                got = await c.read(0, 8192)
                assert got[1500:4500] == b"\x5a" * 3000

        asyncio.run(check())
    assert src.read_bytes() == data  # the source is never written


def test_listens_only_where_told(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    random_image(src, 1 << 20)
    with hikkoshi_server(str(src)) as up, proxy(up.uri, tmp_path, "--no-background") as p:
        assert p.uri.startswith("nbd://127.0.0.1:")
        listening = [ln.split() for ln in Path(f"/proc/{p.pid}/net/tcp").read_text().splitlines()[1:]]
        port = f"{p.port:04X}"
        ours = [cols[1] for cols in listening if cols[1].endswith(":" + port) and cols[3] == "0A"]
        assert ours == [f"0100007F:{port}"]  # 127.0.0.1 only, not 0.0.0.0


def test_background_copy_completes_and_releases_the_source(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = random_image(src, 32 << 20, zero_every=2 << 20)
    up_proc: subprocess.Popen[str] | None = None
    with hikkoshi_server(str(src), "--export", "src") as up, proxy(up.export_uri("src"), tmp_path) as p:
        up_proc = up.proc
        s = wait_detached(tmp_path)
        assert s["present_bytes"] == 32 << 20 and s["percent"] == 100.0
        # Zero halves were never copied: they are holes in the cache.
        assert int(str(s["zero_bytes"])) >= 15 << 20
        assert int(str(s["fetched_background_bytes"])) <= (17 << 20)
        stop(up_proc, signal.SIGKILL)  # the source may go away now

        async def read_all() -> bytes:
            async with NbdClient(p.uri) as c:
                return await c.read(0, 32 << 20)

        assert asyncio.run(read_all()) == data
    cache = tmp_path / "cache.raw"
    assert cache.read_bytes() == data
    assert cache.stat().st_blocks * 512 < 24 << 20  # sparse where the source was zero


def test_upstream_outage(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = random_image(src, 16 << 20)
    port = free_port()

    def serve() -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "hikkoshi", "nbd", "serve", str(src), "--listen", f"127.0.0.1:{port}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        wait_port(port)
        return proc

    upstream = serve()
    procs = [upstream]
    try:
        with proxy(f"nbd://127.0.0.1:{port}/", tmp_path, "--no-background", "--upstream-timeout", "2") as p:

            async def main() -> None:
                async with NbdClient(p.uri) as c:
                    assert await c.read(0, 65536) == data[:65536]
                    stop(procs[0], signal.SIGKILL)
                    # Cached reads and all writes keep working without the source.
                    assert await c.read(0, 65536) == data[:65536]
                    await c.write(0, b"w" * 65536)
                    await c.flush()
                    # A read that needs the source (past the first read's read-ahead) waits, then fails: EIO.
                    with pytest.raises(CommandError) as err:
                        await c.read(12 << 20, 4096)
                    assert err.value.errno == Errno.EIO
                    assert status(tmp_path)["upstream"] == "reconnecting"
                    procs.append(serve())
                    assert await c.read(12 << 20, 4096) == data[12 << 20 : (12 << 20) + 4096]
                    assert await c.read(0, 65536) == b"w" * 65536

            asyncio.run(main())
    finally:
        for proc in procs:
            stop(proc)


def test_bitmap_that_does_not_match_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    random_image(src, 1 << 20)
    with hikkoshi_server(str(src), "--export", "src") as up:
        with proxy(up.export_uri("src"), tmp_path, "--no-background") as p:
            asyncio.run(_read_some(p.uri))
        for extra, message in (
            (["--block-size", "4K"], "block size"),
            (["--upstream", up.export_uri("other")], "caches"),
        ):
            args = proxy_args(
                up.export_uri("src"), tmp_path, "--no-background", "--listen", "127.0.0.1:0", *extra
            )
            out = subprocess.run(
                [sys.executable, "-m", "hikkoshi", "nbd", "proxy", *args],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


async def _read_some(uri: str, offset: int = 0) -> None:
    async with NbdClient(uri) as c:
        await c.read(offset, 4096)
        await c.flush()


def test_status_and_controls(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    random_image(src, 16 << 20)
    with (
        hikkoshi_server(str(src), "--export", "src") as up,
        proxy(up.export_uri("src"), tmp_path, "--bandwidth", "1M") as p,
    ):
        s = status(tmp_path)
        for key in ("size", "present_bytes", "upstream", "fetched_demand_bytes", "fetched_background_bytes",
                    "hit_rate", "rate_bytes_s", "eta_s"):  # fmt: skip
            assert key in s
        assert s["size"] == 16 << 20 and s["upstream"] == "connected" and s["bandwidth"] == 1e6
        ctl = [
            sys.executable,
            "-m",
            "hikkoshi",
            "nbd",
            "status",
            "--control",
            f"unix:{tmp_path / 'px.sock'}",
            "--once",
        ]
        line = subprocess.run(ctl, capture_output=True, text=True, timeout=20, check=True).stdout
        assert "upstream connected" in line
        asyncio.run(_read_some(p.uri, 15 << 20))  # far beyond what 1 MB/s has copied in order so far
        assert status(tmp_path)["reads_fetched"] == 1
        # Unlimited bandwidth through the control socket: the copy finishes.
        from hikkoshi.nbd.control import control_request

        asyncio.run(control_request(tmp_path / "px.sock", "bandwidth", rate=None))
        assert wait_detached(tmp_path)["present_bytes"] == 16 << 20


def test_ext4_free_blocks_are_skipped_when_told(tmp_path: Path) -> None:
    """An ext4 disk 10% full, free space full of old garbage: only what the file system uses is copied."""
    size = 128 << 20
    files = tmp_path / "files"
    files.mkdir()
    for i in range(12):
        (files / f"f{i}").write_bytes(random.Random(i).randbytes(1 << 20))
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(99).randbytes(size))  # garbage in what will be free space
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", str(files), str(src), str(size // 1024) + "k"],
        check=True,
        timeout=60,
    )
    with (
        hikkoshi_server(str(src), "--export", "src") as up,
        proxy(up.export_uri("src"), tmp_path, "--skip-fs-free"),
    ):
        s = wait_detached(tmp_path)
        copied = int(str(s["fetched_background_bytes"])) + int(str(s["fetched_demand_bytes"]))
        assert copied < size * 0.25, s  # ~12 MiB of files plus metadata, not the 128 MiB disk
    cache = tmp_path / "cache.raw"
    fsck = subprocess.run(["e2fsck", "-fn", str(cache)], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for i in range(12):
        dumped = subprocess.run(
            ["debugfs", "-R", f"cat /f{i}", str(cache)], capture_output=True, timeout=60, check=True
        ).stdout
        assert dumped == random.Random(i).randbytes(1 << 20)


def test_hot_regions_are_copied_first(tmp_path: Path) -> None:
    """The source's access counts (meta context hikkoshi:heat) put its busiest region first in line."""
    src = tmp_path / "src.raw"
    data = random_image(src, 32 << 20)
    hot = 28 << 20  # near the end: a copy in disk order at 2 MB/s would reach it after ~14 s

    async def heat(uri: str) -> None:
        async with NbdClient(uri) as c:
            for _ in range(20):
                await c.read(hot, 1 << 20)

    with hikkoshi_server(str(src), "--export", "src") as up:
        asyncio.run(heat(up.export_uri("src")))
        with proxy(up.export_uri("src"), tmp_path, "--bandwidth", "2M") as p:
            deadline = time.monotonic() + 20
            while (
                time.monotonic() < deadline
                and int(str(status(tmp_path)["fetched_background_bytes"])) < 2 << 20
            ):
                time.sleep(0.1)
            before = status(tmp_path)
            assert int(str(before["present_bytes"])) < 24 << 20  # far from done in disk order

            async def read_hot() -> bytes:
                async with NbdClient(p.uri) as c:
                    return await c.read(hot, 1 << 20)

            assert asyncio.run(read_hot()) == data[hot : hot + (1 << 20)]
            assert (
                status(tmp_path)["reads_fetched"] == before["reads_fetched"]
            )  # served locally: already copied


def test_guest_write_during_fetch_wins(tmp_path: Path) -> None:
    """Writes racing fetches of the same blocks (slow, out-of-order upstream): the guest's data stays."""
    src = tmp_path / "src.raw"
    data = random_image(src, 4 << 20)
    with (
        shuffling_server(src, max_delay_ms=30) as up,
        proxy(up.uri, tmp_path, "--no-background", "--block-size", "4K") as p,
    ):

        async def race() -> None:
            async with NbdClient(p.uri) as c:
                blocks = list(range(0, 1020, 3))
                written = {b: bytes([b % 250 + 1]) * 4096 for b in blocks}
                # Reads start fetches; writes of whole and partial blocks land while they are in flight.
                jobs: list[Coroutine[Any, Any, object]] = [c.read(b * 4096, 4096) for b in blocks]
                jobs += [c.write(b * 4096, written[b]) for b in blocks]
                jobs += [c.write(b * 4096 + 4096 + 100, b"p" * 50) for b in blocks]  # partial, next block
                await asyncio.gather(*jobs)
                for b in blocks:
                    assert await c.read(b * 4096, 4096) == written[b]
                    nxt = await c.read(b * 4096 + 4096, 4096)
                    expect = bytearray(data[b * 4096 + 4096 : b * 4096 + 8192])
                    expect[100:150] = b"p" * 50
                    assert nxt == bytes(expect)

        asyncio.run(race())


def test_restart_over_a_complete_cache_needs_no_upstream(tmp_path: Path) -> None:
    """Once relocated, the proxy is started again (a VM restarted on the destination) with its source
    gone for good: it serves the cache without trying to reach the upstream."""
    src = tmp_path / "src.raw"
    data = random_image(src, 8 << 20, zero_every=1 << 20)
    with hikkoshi_server(str(src), "--export", "disk") as up:
        uri = up.export_uri("disk")
        with proxy(uri, tmp_path) as p:
            wait_detached(tmp_path)
    # The source server is gone; the same proxy command line starts, detached, and serves everything.
    with proxy(uri, tmp_path) as p:
        assert status(tmp_path)["upstream"] == "detached"
        copy = tmp_path / "copy.raw"
        run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", p.export_uri(""), str(copy))
        assert copy.read_bytes() == data


def test_nbd_commands_start_without_the_vm_and_migration_code() -> None:
    """A proxy or NBD service is started for every VM start and migration, which wait for it: its command
    line parser leaves the VM and migration commands (and what they import) out."""
    probe = (
        "import sys; from hikkoshi.cli.main import build_parser; "
        "args = build_parser(sys.argv[1:]).parse_args(sys.argv[1:]); "
        "print(args.func.__module__, sorted(m for m in sys.modules if m.startswith(('hikkoshi.vm', "
        "'hikkoshi.migrate', 'pydantic'))))"
    )
    argv = ["-v", "nbd", "proxy", "--upstream", "nbd://h/x", "--cache", "c"]
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
    assert out.stdout.split(None, 1) == ["hikkoshi.cli.nbd_proxy", "[]\n"]
    # Everything else still parses as before, even with an option whose value reads "nbd".
    out = subprocess.run(
        [sys.executable, "-m", "hikkoshi", "--agent", "nbd", "vm", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "start" in out.stdout


def test_given_its_size_the_proxy_serves_before_reaching_its_upstream(tmp_path: Path) -> None:
    """With --size the proxy listens at once (a VM's start waits for that) and connects meanwhile; a read
    waits for the upstream. An upstream of another size ends the proxy before any read is sent there."""
    one_way = 0.75  # reaching the upstream takes 4 of these (TCP's handshake, greeting, options)
    src = tmp_path / "src.raw"
    data = random_image(src, 4 << 20)

    async def start(size: int, name: str, upstream: str) -> tuple[asyncio.subprocess.Process, float, str]:
        args = proxy_args(upstream, tmp_path, "--no-background", "--size", str(size))
        args[args.index("--cache") + 1] = str(tmp_path / f"{name}.raw")
        args[args.index("--control") + 1] = f"unix:{tmp_path / name}.ctl"
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hikkoshi", "nbd", "proxy", *args, "--listen", f"unix:{tmp_path / name}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        return proc, time.monotonic() - t0, line

    async def scenario() -> None:
        exports = ExportTable()
        export = Export("disk", RawFile(src, read_only=True))
        exports.add(export)
        server = NbdServer(exports, [ListenAddress(host="127.0.0.1", port=0)])
        async with asyncio.TaskGroup() as tg:
            tg.create_task(server.serve())
            await server.ready.wait()
            async with WanLink(WanParams(one_way * 1000), server.bound[0]) as link:
                upstream = f"nbd://127.0.0.1:{link.port}/disk"
                proc, took, line = await start(len(data), "good", upstream)
                try:
                    assert "serving" in line and took < 4 * one_way, (line, took)
                    async with NbdClient(f"nbd+unix:///disk?socket={tmp_path / 'good'}") as c:
                        assert await c.read(1 << 20, 1 << 20) == data[1 << 20 : 2 << 20]
                finally:
                    proc.terminate()
                    await proc.wait()
                # The wrong size: the read fails, the proxy ends saying why, and never asked for data.
                before = export.stats.bytes_read
                proc, took, line = await start(len(data) + 65536, "bad", upstream)
                assert "serving" in line
                async with NbdClient(f"nbd+unix:///disk?socket={tmp_path / 'bad'}") as c:
                    with pytest.raises((CommandError, ConnectionError)):
                        await c.read(0, 65536)
                assert await asyncio.wait_for(proc.wait(), 30) != 0
                assert proc.stderr is not None
                assert f"not {len(data) + 65536}" in (await proc.stderr.read()).decode()
                assert export.stats.bytes_read == before
            server.stop()

    asyncio.run(scenario())
