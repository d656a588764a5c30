"""A QEMU guest runs on the relocation proxy while its disk is still being relocated."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.guest.workloads import BLOCK_SIZE, console_result, verify_diskcheck_image
from hikkoshi.nbd.control import control_request
from tests.support.guests import guest, run_guest
from tests.support.proxies import proxy, status, wait_detached
from tests.support.servers import hikkoshi_server

__all__ = ["guest"]  # the fixture, shared with the boot tests

BLOCKS = 1024


@pytest.mark.slow
def test_guest_writes_through_proxy_during_relocation(guest: GuestImage, tmp_path: Path) -> None:
    size = 64 << 20
    src = tmp_path / "src.raw"
    original = random.Random(21).randbytes(size)
    src.write_bytes(original)
    run = random.randrange(1, 2**31)
    # 1 MB/s: the 64 MiB background copy cannot finish while the guest runs.
    with (
        hikkoshi_server(str(src), "--export", "disk") as up,
        proxy(up.export_uri("disk"), tmp_path, "--bandwidth", "1M") as p,
    ):
        result = run_guest(guest, p.uri, "diskcheck", tmp_path, params={"blocks": BLOCKS, "run": run})
        line = console_result(result.console, "HIKKOSHI-DISKCHECK")
        assert line == f"HIKKOSHI-DISKCHECK OK blocks={BLOCKS} run={run}", result.console[-3000:]
        during = status(tmp_path)
        assert during["upstream"] == "connected" and int(str(during["present_bytes"])) < size
        asyncio.run(control_request(tmp_path / "px.sock", "bandwidth", rate=None))
        wait_detached(tmp_path)
    cache = tmp_path / "cache.raw"
    # The guest's records are in the relocated disk, and everything else is the source's data.
    assert verify_diskcheck_image(cache, run=run, blocks=BLOCKS) == BLOCKS
    with cache.open("rb") as f:
        f.seek(BLOCKS * BLOCK_SIZE)
        assert f.read() == original[BLOCKS * BLOCK_SIZE :]
    assert src.read_bytes() == original  # the source was never written
