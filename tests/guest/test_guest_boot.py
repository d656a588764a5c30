"""A QEMU guest boots the test image and writes records through our NBD server; the host checks them.

The slow tests build the guest image (downloads Debian's kernel once into the cache) and boot it.
The fast ones check that the host-side verifier really rejects damaged disks, so the slow test can
fail.
"""

from __future__ import annotations

import gzip
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from hikkoshi.guest import cpio
from hikkoshi.guest.guest_image import GuestImage, kernel_cmdline, modinfo, qemu_command
from hikkoshi.guest.workloads import (
    BLOCK_SIZE,
    DiskcheckError,
    console_result,
    diskcheck_block,
    verify_diskcheck_image,
)
from tests.support.guests import guest as guest
from tests.support.guests import nbd_server, run_guest

BLOCKS = 1024  # 4 MiB of records
IMAGE_SIZE = 64 << 20


# --- slow: boot the guest ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_diskcheck_through_our_nbd_server(guest: GuestImage, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    run = random.randrange(1, 2**31)  # names this boot's records, so stale data cannot pass

    with nbd_server(image, tmp_path / "server.log") as uri:
        result = run_guest(guest, uri, "diskcheck", tmp_path, params={"blocks": BLOCKS, "run": run})

    line = console_result(result.console, "HIKKOSHI-DISKCHECK")
    assert line == f"HIKKOSHI-DISKCHECK OK blocks={BLOCKS} run={run}", result.console[-3000:]
    # Independently of the guest's own check: the records are on the host's image file...
    assert verify_diskcheck_image(image, run=run, blocks=BLOCKS) == BLOCKS
    # ...and nothing else was written.
    assert image.stat().st_size == IMAGE_SIZE
    with image.open("rb") as f:
        f.seek(BLOCKS * BLOCK_SIZE)
        rest = f.read()
    assert rest == bytes(len(rest))


@pytest.mark.slow
def test_diskcheck_reports_failure_from_the_guest(guest: GuestImage, tmp_path: Path) -> None:
    image = tmp_path / "small.raw"
    with image.open("wb") as f:
        f.truncate(1 << 20)  # smaller than the records: the guest must say FAIL, not OK
    with nbd_server(image, tmp_path / "server.log") as uri:
        result = run_guest(guest, uri, "diskcheck", tmp_path, params={"blocks": BLOCKS, "run": 5})
    line = console_result(result.console, "HIKKOSHI-DISKCHECK")
    assert line is not None and line.startswith("HIKKOSHI-DISKCHECK FAIL reason=disk-too-small"), line
    assert console_result(result.console, "HIKKOSHI-INIT") == "HIKKOSHI-INIT end status=1"


@pytest.mark.slow
def test_idle_guest_boots_and_powers_off(guest: GuestImage, tmp_path: Path) -> None:
    result = run_guest(guest, None, "idle", tmp_path, params={"seconds": 0}, timeout=120)
    assert console_result(result.console, "HIKKOSHI-IDLE") == "HIKKOSHI-IDLE READY"
    assert console_result(result.console, "HIKKOSHI-INIT") == "HIKKOSHI-INIT end status=0"
    assert "insmod" not in result.console  # every module loaded


@pytest.mark.slow
def test_initramfs_has_modules_in_dependency_order(guest: GuestImage) -> None:
    members = {e.name: e for e in cpio.read_newc(gzip.decompress(guest.initrd.read_bytes()))}
    assert members["init"].data.startswith(b"#!/bin/sh")
    assert members["bin/sh"].is_symlink
    order = members["lib/modules/load-order"].data.decode().split()
    assert order == list(guest.modules)
    assert {"virtio_pci", "virtio_blk", "virtio_net"} <= set(order)
    for i, name in enumerate(order):
        depends = modinfo(members[f"lib/modules/{name}.ko"].data).get("depends", "")
        for dep in filter(None, depends.split(",")):
            assert dep in order[:i], f"{name} needs {dep} loaded first"


# --- fast: the verifier and the command line --------------------------------------------------------------


def _write_records(path: Path, run: int, blocks: int) -> None:
    with path.open("wb") as f:
        for seq in range(blocks):
            f.write(diskcheck_block(run, seq, blocks))
        f.truncate(blocks * BLOCK_SIZE + (1 << 20))


def _flip(offset: int) -> Callable[[bytearray], None]:
    def damage(data: bytearray) -> None:
        data[offset] ^= 0x01

    return damage


def _swap_blocks(data: bytearray) -> None:
    a, b = slice(2 * BLOCK_SIZE, 3 * BLOCK_SIZE), slice(5 * BLOCK_SIZE, 6 * BLOCK_SIZE)
    data[a], data[b] = data[b], data[a]


def _lose_block(data: bytearray) -> None:
    data[3 * BLOCK_SIZE : 4 * BLOCK_SIZE] = bytes(BLOCK_SIZE)


def _misplace_sector(data: bytearray) -> None:
    # Sector 3 of block 4 overwritten by sector 3 of block 6: header and sums stay intact.
    dst, src = 4 * BLOCK_SIZE + 3 * 512, 6 * BLOCK_SIZE + 3 * 512
    data[dst : dst + 512] = data[src : src + 512]


@pytest.mark.parametrize(
    ("damage", "bad_block"),
    [
        (_flip(1 * BLOCK_SIZE + 200), 1),  # a payload digit
        (_flip(7 * BLOCK_SIZE + BLOCK_SIZE - 20), 7),  # the footer's checksum
        (_flip(0 * BLOCK_SIZE + 40), 0),  # the header's sequence number
        (_swap_blocks, 2),
        (_lose_block, 3),
        (_misplace_sector, 4),
    ],
)
def test_verifier_rejects_damaged_disk(
    tmp_path: Path, damage: Callable[[bytearray], None], bad_block: int
) -> None:
    image = tmp_path / "disk.raw"
    _write_records(image, run=77, blocks=8)
    assert verify_diskcheck_image(image, run=77, blocks=8) == 8
    data = bytearray(image.read_bytes())
    damage(data)
    image.write_bytes(data)
    with pytest.raises(DiskcheckError) as err:
        verify_diskcheck_image(image, run=77, blocks=8)
    assert err.value.block == bad_block


def test_verifier_rejects_other_runs_and_short_disks(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    _write_records(image, run=77, blocks=8)
    with pytest.raises(DiskcheckError, match="run=77"):
        verify_diskcheck_image(image, run=78, blocks=8)
    with pytest.raises(DiskcheckError, match="of=8"):
        verify_diskcheck_image(image, run=77, blocks=9)
    image.write_bytes(image.read_bytes()[: 8 * BLOCK_SIZE - 1])
    with pytest.raises(DiskcheckError, match="short"):
        verify_diskcheck_image(image, run=77, blocks=8)


def test_console_result_takes_the_last_tagged_line() -> None:
    console = (
        "[    1.0] Run /init as init process\r\n"
        "HIKKOSHI-INIT workload=diskcheck\r\n"
        "HIKKOSHI-DISKCHECKER unrelated\r\n"
        "HIKKOSHI-DISKCHECK FAIL reason=mismatch block=3 byte=12300\r\n"
    )
    assert (
        console_result(console, "HIKKOSHI-DISKCHECK")
        == "HIKKOSHI-DISKCHECK FAIL reason=mismatch block=3 byte=12300"
    )
    assert console_result(console, "HIKKOSHI-IDLE") is None


def test_kernel_cmdline() -> None:
    assert kernel_cmdline("diskcheck", {"blocks": 16, "run": 5}) == (
        "console=ttyS0 panic=-1 hikkoshi.workload=diskcheck hikkoshi.blocks=16 hikkoshi.run=5"
    )
    with pytest.raises(ValueError, match="unknown workload"):
        kernel_cmdline("nonesuch")
    with pytest.raises(ValueError):
        kernel_cmdline("idle", {"Bad-Key": 1})
    with pytest.raises(ValueError):
        kernel_cmdline("idle", {"seconds": "1 init=/bin/sh"})


def test_qemu_command(tmp_path: Path) -> None:
    fake = GuestImage(
        kernel=tmp_path / "g" / "vmlinux",
        initrd=tmp_path / "g" / "initrd.img",
        kernel_release="6.1.0-0-amd64",
        packages={},
        modules=(),
        key="0" * 16,
    )
    cmd = qemu_command(
        fake, "nbd://127.0.0.1:1234", "diskcheck", console_log=tmp_path / "c,1.log", accel="tcg"
    )
    assert cmd[:5] == ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64"]
    assert "-no-reboot" in cmd
    assert cmd[cmd.index("-m") + 1] == "256"
    assert cmd[cmd.index("-drive") + 1] == "file=nbd://127.0.0.1:1234,format=raw,if=virtio,cache=none"
    assert cmd[cmd.index("-chardev") + 1] == f"file,id=console,path={tmp_path}/c,,1.log"
    assert "hikkoshi.workload=diskcheck" in cmd[cmd.index("-append") + 1]
    assert "-drive" not in qemu_command(fake, None, "idle", accel="kvm")
