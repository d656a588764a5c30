"""Real etcd members for tests: start one on free loopback ports, and run a test's coroutine."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from hikkoshi.cluster.etcd_process import EtcdMember, MemberSpec, free_ports

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    """Run a test's coroutine in a fresh event loop."""

    async def main() -> T:
        return await coro

    return asyncio.run(main())


def gone(pid: int) -> bool:
    """Whether no process ``pid`` exists (zombies reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def start_member(base: Path, name: str = "solo") -> EtcdMember:
    client, peer = free_ports(2)
    member = EtcdMember(MemberSpec(name, base / name, client, peer))
    member.start()
    try:
        run(member.wait_healthy())
    except BaseException:
        member.stop_sync()
        raise
    return member
