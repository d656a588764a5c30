"""Tap devices on Linux bridges, for NICs with ``network = "bridge:NAME"``.

The supervisor creates one persistent tap per bridged NIC before QEMU starts, attaches it to the
bridge and hands its name to QEMU (``-netdev tap,ifname=...,script=no``); it deletes the tap when
QEMU is gone. Tap names derive from the VM's uuid and the NIC's index, so a tap left behind by a
crashed supervisor is found and replaced at the next start. Needs ``CAP_NET_ADMIN`` (root).
"""

from __future__ import annotations

import asyncio
import hashlib
from uuid import UUID

IP = "ip"


def tap_name(uuid: UUID, index: int, host: str = "") -> str:
    """``hk<8 hex digits>n<index>``: stable, and within Linux's 15 characters.

    Without ``host`` the digits are the uuid's; with it, 6 of the uuid's and 2 of a hash of ``host``
    (the runtime root of the supervisor): two instances of one VM on one machine -- the source and
    the destination of a migration between two local "hosts" -- get different taps."""
    if host:
        digest = hashlib.sha256(host.encode()).hexdigest()
        name = f"hk{uuid.hex[:6]}{digest[:2]}n{index}"
    else:
        name = f"hk{uuid.hex[:8]}n{index}"
    assert len(name) <= 15
    return name


def tap_mac(guest_mac: str) -> str:
    """The tap's own MAC: the guest's with ``fe`` first, the way libvirt does it.

    A Linux bridge takes the lowest MAC among its ports as its own; ``fe:`` keeps taps from
    changing the bridge's address when VMs come and go.
    """
    return "fe" + guest_mac[2:]


def create_commands(name: str, bridge: str, guest_mac: str) -> list[list[str]]:
    """The ``ip`` commands that create tap ``name`` and attach it to ``bridge``."""
    return [
        [IP, "tuntap", "add", "dev", name, "mode", "tap"],
        [IP, "link", "set", "dev", name, "address", tap_mac(guest_mac)],
        [IP, "link", "set", "dev", name, "master", bridge],
        [IP, "link", "set", "dev", name, "up"],
    ]


def delete_command(name: str) -> list[str]:
    """The ``ip`` command that deletes tap ``name``."""
    return [IP, "link", "del", "dev", name]


class TapError(RuntimeError):
    """An ``ip`` command failed."""


async def _ip(cmd: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def create_tap(name: str, bridge: str, guest_mac: str) -> None:
    """Create the tap (replacing a leftover of the same name) and attach it to ``bridge``."""
    await delete_tap(name)
    for cmd in create_commands(name, bridge, guest_mac):
        code, out = await _ip(cmd)
        if code != 0:
            await delete_tap(name)
            raise TapError(f"{' '.join(cmd)} failed: {out}")


async def delete_tap(name: str) -> None:
    """Delete the tap if it exists."""
    await _ip(delete_command(name))
