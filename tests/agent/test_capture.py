"""What an attacker on the network between two hosts sees of a migration: nothing of the guest. Two
agents on loopback migrate a busy guest (hybrid: memory through QEMU's stream, the disks through the
relocation), with a marker string planted in its memory (the kernel command line, the workload's
environment) and on a disk (written there before it booted; the guest never touches that disk), while
every TCP segment on ``lo`` is captured. Encrypted (the default), neither marker is in any connection's
bytes; as a control, with ``--insecure-loopback`` both are (so the capture would have seen them)."""

from __future__ import annotations

import os
import random
import secrets
from pathlib import Path

import pytest

from hikkoshi.guest.guest_image import GuestImage
from tests.support.agent_vms import stop_and_verify, vm_names, wait_console
from tests.support.agents import agents
from tests.support.capture import LoopbackCapture
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools

MiB = 1 << 20


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [True, False], ids=["tls", "insecure-control"])
def test_the_guest_never_crosses_the_wire_in_the_clear(
    guest: GuestImage, tmp_path: Path, encrypted: bool
) -> None:
    need_qemu_tools()
    if os.geteuid() != 0:
        pytest.skip("capturing on lo needs root")
    run = random.randrange(1, 2**31)
    memory_marker = "HKMEM" + secrets.token_hex(12)
    disk_marker = ("HKDSK" + secrets.token_hex(12)).encode()
    with agents(tmp_path, "alpha", "beta", insecure=not encrypted) as (a, b):
        a.cli(
            "vm", "create", "spy", "--memory", "192", "--disk", "32M", "--disk", "8M", "--guest", "busy",
            "--no-nic", "--param", f"run={run}", "--param", "progress=4", "--param", "scrub=16",
            "--param", "rate=4", "--param", "mb=24", "--param", f"marker={memory_marker}",
        )  # fmt: skip
        with (a.datastores["main"] / "spy" / "disk1.raw").open("r+b") as disk:
            for offset in range(0, 8 * MiB, 2 * MiB):
                disk.seek(offset + 4096)
                disk.write(disk_marker * 16)
        a.cli("vm", "start", "spy", timeout=300)
        wait_console(a, "spy", rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        capture = LoopbackCapture().start()
        try:
            record = a.json("migrate", "spy", "--to", b.url, "--json", timeout=600)
        finally:
            capture.stop()
        assert record["phase"] == "done", record
        report = record["report"]
        assert report["encrypted"] is encrypted
        # The capture saw the migration: at least the memory that was sent.
        assert capture.bytes > report["memory_bytes"], (capture.bytes, report["memory_bytes"])
        in_memory, on_disk = capture.find(memory_marker.encode()), capture.find(disk_marker)
        if encrypted:
            assert in_memory == [] and on_disk == [], (in_memory, on_disk)
        else:
            assert in_memory and on_disk, sorted(capture.flows(), key=lambda f: -f[1])[:6]
        # Both markers did arrive, and the guest's data verifies on the destination.
        assert disk_marker in (b.datastores["main"] / "spy" / "disk1.raw").read_bytes()
        assert vm_names(b) == {"spy": "running"}
        mark = len(b.cli("vm", "console", "spy").stdout)
        wait_console(b, "spy", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(b, "spy", run, mark)
