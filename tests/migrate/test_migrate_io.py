"""The I/O pieces a migration relies on, with real processes, sockets and NBD clients (no QEMU guest):
listeners added to and removed from a running server, and the relocation proxy's invalidation from the
source's dirty bitmap (hybrid storage), and its paused start (postcopy storage)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.nbd.client import NbdClient
from hikkoshi.nbd.control import ControlError, control_request
from tests.support.images import random_image
from tests.support.proxies import proxy, wait_detached
from tests.support.servers import Served, hikkoshi_server, run_tool, stop

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "nbdinfo")),
    reason="needs qemu-utils and libnbd-bin",
)

MiB = 1 << 20
KiB = 1 << 10


def call(sock: Path, command: str, **args: Any) -> Any:
    return asyncio.run(control_request(sock, command, **args))


def wait_for(sock: Path, ready: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """Poll a proxy's status until ``ready`` says yes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = call(sock, "status")
        if ready(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"proxy never got there: {call(sock, 'status')}")


def nbdinfo_size(uri: str) -> int:
    info = json.loads(run_tool("nbdinfo", "--json", uri).stdout)
    size: int = info["exports"][0]["export-size"]
    return size


def read_all(uri: str, out: Path) -> bytes:
    """The whole export, as qemu-img reads it (block status included: holes are not read)."""
    out.unlink(missing_ok=True)
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    return out.read_bytes()


# --- listeners added and removed at runtime ---------------------------------------------------------------


def test_listen_and_unlisten_at_runtime(served: Served, image: Path, tmp_path: Path) -> None:
    ctl = served.control
    assert ctl is not None
    data = image.read_bytes()
    original = [f"127.0.0.1:{served.port}"]
    assert call(ctl, "listening") == original

    names = call(ctl, "listen", address="127.0.0.1:0")
    (name,) = names
    host, port = name.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) not in (0, served.port)
    assert call(ctl, "listening") == [*original, name]

    # Real clients read the export through the new listener.
    tcp_uri = f"nbd://{name}/disk"
    assert nbdinfo_size(tcp_uri) == len(data)
    assert read_all(tcp_uri, tmp_path / "out.raw") == data

    async def through_the_new_listener() -> None:
        async with NbdClient(tcp_uri) as c:
            assert await c.read(0, MiB) == data[:MiB]
            assert await control_request(ctl, "unlisten", address=name) == {"removed": True}
            # No new connection gets in, and the peer's connection ends with its listener.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", int(port))
            with pytest.raises((ConnectionError, OSError)):
                await c.read(4 * MiB, MiB)

    asyncio.run(through_the_new_listener())
    assert call(ctl, "listening") == original
    assert call(ctl, "unlisten", address=name) == {"removed": 0}  # already gone
    assert call(ctl, "unlisten", address="10.1.2.3:4") == {"removed": 0}
    # The original listener was never touched.
    assert nbdinfo_size(served.export_uri("disk")) == len(data)
    assert image.read_bytes() == data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "listen: address: Field required"),
        ({"address": "nonsense"}, "bad listen address"),
        ({"address": "127.0.0.1:99999"}, "bad port"),
        # Never every address of the host, never plain TCP beyond loopback, never a Unix socket:
        ({"address": "0.0.0.0:0"}, "every address of this host"),
        ({"address": "[::]:0"}, "every address of this host"),
        ({"address": "192.0.2.1:0"}, "without TLS a peer listens on a loopback address only"),
        ({"address": "unix:/tmp/x.sock"}, "a TCP address"),
        ({"address": "127.0.0.1:0", "tls_dir": "/nonexistent"}, "lacks ca-cert.pem"),
        ({"address": "127.0.0.1:0", "peer": "x", "home": "/"}, "home: Extra inputs are not permitted"),
    ],
)
def test_listen_on_a_bad_address_is_a_clear_error(served: Served, args: dict[str, Any], message: str) -> None:
    ctl = served.control
    assert ctl is not None
    with pytest.raises(ControlError, match=message):
        call(ctl, "listen", **args)
    assert call(ctl, "listening") == [f"127.0.0.1:{served.port}"]
    assert nbdinfo_size(served.export_uri("disk")) == 64 * MiB  # still serving


def test_listen_on_a_port_in_use_is_a_clear_error(served: Served) -> None:
    ctl = served.control
    assert ctl is not None
    taken = f"127.0.0.1:{served.port}"
    with pytest.raises(ControlError, match=f"cannot listen on {taken}: .*in use"):
        call(ctl, "listen", address=taken)
    assert call(ctl, "listening") == [taken]


# --- the relocation proxy: invalidation from the source's dirty bitmap -------------------------------------

SIZE = 16 * MiB
BLOCK = 64 * KiB  # the proxy's block size (its default)
GRANULE = 4 * KiB  # the source bitmap's granularity
HOLES = 2 * MiB  # random_image(zero_every=...): the first half of every 2 MiB is a hole

#: Writes made on the source after the proxy copied everything: (offset, length, fill byte).
WRITES = [
    (MiB + 100_000, 5_000, 0xAB),  # inside data, across a 4 KiB boundary
    (100_000, 5_000, 0xAC),  # inside a hole
    (2 * MiB + 300_000, 70_000, 0xCD),  # inside a hole the proxy never fetched (marked zero at start)
    (MiB - 10_000, 20_000, 0x11),  # hole into data
    (5 * MiB, 64 * KiB, 0x22),  # exactly one proxy block
    (SIZE - 4096, 4096, 0x33),  # the last granule
]


def _units(ranges: list[tuple[int, int, int]], unit: int) -> set[int]:
    return {u for off, n, _ in ranges for u in range(off // unit, (off + n - 1) // unit + 1)}


def guest_writes(uri: str, model: bytearray) -> None:
    """The guest's WRITES, through the export at ``uri`` (qemu-io), and into ``model`` too."""
    script = []
    for off, n, fill in WRITES:
        script += ["-c", f"write -P {fill:#x} {off} {n}"]
        model[off : off + n] = bytes([fill]) * n
    run_tool("qemu-io", "-f", "raw", *script, uri)


def test_invalidation_drops_what_the_source_changed(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    model = bytearray(random_image(src, SIZE, zero_every=HOLES))
    px = tmp_path / "px"
    px.mkdir()
    src_ctl = tmp_path / "src.sock"
    px_ctl = px / "px.sock"
    with hikkoshi_server(str(src), "--export", "src", "--control", f"unix:{src_ctl}") as up:
        assert call(src_ctl, "bitmap-add", name="m", granularity=GRANULE) == {
            "name": "m",
            "granularity": GRANULE,
        }
        with proxy(up.export_uri("src"), px, "--dirty-bitmap", "m") as p:
            # The copy completes, but the dirty bitmap holds the upstream until the invalidation.
            s = wait_for(px_ctl, lambda s: s["phase"] == "holding upstream")
            assert s["present_bytes"] == SIZE and s["upstream"] == "connected"
            assert s["zero_bytes"] >= SIZE // 2 - BLOCK  # the holes were marked, not fetched
            assert s["fetched_demand_bytes"] == 0
            assert call(src_ctl, "bitmap-get", name="m")["dirty_bytes"] == 0  # the proxy only read

            # The guest (still on the source) writes, through the source's NBD server.
            guest_writes(up.export_uri("src"), model)
            assert src.read_bytes() == model
            dirty = call(src_ctl, "bitmap-get", name="m")
            assert dirty["dirty_bytes"] == len(_units(WRITES, GRANULE)) * GRANULE
            # Nothing changed for the proxy yet: it still holds everything, and the old bytes.
            assert call(px_ctl, "status")["phase"] == "holding upstream"

            # The background copy is paused first, so that dropped blocks stay missing for a while.
            assert call(px_ctl, "pause")["paused"]
            result = call(px_ctl, "invalidate")
            assert result["dirty_bytes"] == dirty["dirty_bytes"]  # the bitmap, read through NBD
            # Whole proxy blocks are dropped: every block a write touched, and nothing else.
            dropped = len(_units(WRITES, BLOCK)) * BLOCK
            assert result["dropped_bytes"] == dropped
            assert result["present_bytes"] == SIZE - dropped
            s = wait_for(px_ctl, lambda s: s["phase"] == "copying")
            assert s["present_bytes"] == SIZE - dropped and s["upstream"] == "connected"

            # What the source once reported as holes and was written since is data now: block status
            # says so (else qemu-img would skip it), and reads fetch the new bytes.
            uri = p.export_uri("src")
            for off, n, _ in WRITES:
                assert all(kind & 1 == 0 for kind in _kinds(uri, off, n)), (off, n)
            assert read_all(uri, tmp_path / "out.raw") == model

            # Resumed, the copy finishes and the upstream may go.
            call(px_ctl, "resume")
            s = wait_detached(px)
            assert s["present_bytes"] == SIZE and s["upstream"] == "detached" and s["phase"] == "complete"
            stop(up.proc, signal.SIGKILL)  # the source is gone: everything is served from the cache
            assert read_all(uri, tmp_path / "out.raw") == model
            assert (
                asyncio.run(_read(uri, 2 * MiB + 290_000, 90_000))
                == model[2 * MiB + 290_000 : 2 * MiB + 380_000]
            )
    assert (px / "cache.raw").read_bytes() == model


def _kinds(uri: str, offset: int, length: int) -> set[int]:
    """The block status types (bit 0: hole, bit 1: zero) nbdinfo sees over a byte range."""
    entries = json.loads(run_tool("nbdinfo", "--map", "--json", uri).stdout)
    return {
        e["type"] for e in entries if e["offset"] < offset + length and e["offset"] + e["length"] > offset
    }


async def _read(uri: str, offset: int, length: int) -> bytes:
    async with NbdClient(uri) as c:
        return await c.read(offset, length)


def test_invalidate_needs_a_dirty_bitmap(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    random_image(src, MiB)
    with (
        hikkoshi_server(str(src), "--export", "src") as up,
        proxy(up.export_uri("src"), tmp_path, "--no-background"),
        pytest.raises(ControlError, match="no dirty bitmap to invalidate from"),
    ):
        call(tmp_path / "px.sock", "invalidate")


def test_invalidate_refuses_a_bitmap_the_source_lacks(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    random_image(src, MiB)
    with (
        hikkoshi_server(str(src), "--export", "src") as up,
        proxy(up.export_uri("src"), tmp_path, "--dirty-bitmap", "nope", "--no-background"),
        pytest.raises(ControlError, match="does not offer hikkoshi:dirty:nope"),
    ):
        call(tmp_path / "px.sock", "invalidate")


def test_a_paused_proxy_touches_nothing_until_resumed(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = random_image(src, SIZE, zero_every=HOLES)
    src_ctl = tmp_path / "src.sock"
    px = tmp_path / "px"
    px.mkdir()
    px_ctl = px / "px.sock"
    with (
        hikkoshi_server(str(src), "--export", "src", "--control", f"unix:{src_ctl}") as up,
        proxy(up.export_uri("src"), px, "--start-paused") as p,
    ):
        s = wait_for(px_ctl, lambda s: s["phase"] == "paused")
        assert s["paused"] and s["upstream"] == "connected"
        assert s["present_bytes"] == 0 and s["zero_bytes"] == 0
        assert s["fetched_background_bytes"] == s["fetched_demand_bytes"] == 0
        # The source saw the proxy connect, and not one request: no reads, not even its map.
        stats = call(src_ctl, "stats", export="src")["src"]
        assert stats["connections"] >= 1 and stats["requests"] == {}
        assert call(px_ctl, "status")["present_bytes"] == 0

        resumed = call(px_ctl, "resume")
        assert not resumed["paused"]
        s = wait_detached(px)
        assert s["present_bytes"] == SIZE and int(str(s["zero_bytes"])) >= SIZE // 2 - BLOCK
        requests = call(src_ctl, "stats", export="src")["src"]["requests"]
        assert requests.get("READ", 0) > 0 and requests.get("BLOCK_STATUS", 0) > 0
        assert read_all(p.export_uri("src"), tmp_path / "out.raw") == data
    assert (px / "cache.raw").read_bytes() == data


def test_blocks_the_source_changed_wait_for_the_switchover(tmp_path: Path) -> None:
    """Before the switchover the background copy leaves out what the source's dirty bitmap marks (it
    would be dropped there for sure, after crossing the link beside the memory stream); the
    invalidation then drops nothing, and the copy ends with the source's current bytes."""
    src = tmp_path / "src.raw"
    model = bytearray(random_image(src, SIZE, zero_every=HOLES))
    px = tmp_path / "px"
    px.mkdir()
    src_ctl = tmp_path / "src.sock"
    px_ctl = px / "px.sock"
    with hikkoshi_server(str(src), "--export", "src", "--control", f"unix:{src_ctl}") as up:
        call(src_ctl, "bitmap-add", name="m", granularity=GRANULE)
        # The guest writes on the source after the migration began, before the proxy reads anything.
        guest_writes(up.export_uri("src"), model)
        with proxy(up.export_uri("src"), px, "--dirty-bitmap", "m") as p:
            s = wait_for(px_ctl, lambda s: s["phase"] == "waiting for the switchover")
            deferred = len(_units(WRITES, BLOCK)) * BLOCK
            assert s["present_bytes"] == SIZE - deferred and s["upstream"] == "connected"
            result = call(px_ctl, "invalidate")
            assert result["dropped_bytes"] == 0  # none of them was fetched
            s = wait_detached(px)
            assert s["present_bytes"] == SIZE
            assert read_all(p.export_uri("src"), tmp_path / "out.raw") == model
    assert (px / "cache.raw").read_bytes() == model
