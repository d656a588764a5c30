"""Real etcd members for tests: start one on free loopback ports, and run a test's coroutine."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

from hikkoshi.cluster.etcd_process import EtcdMember, LocalCluster, MemberSpec, free_ports

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


@contextlib.contextmanager
def member_running(base: Path) -> Iterator[EtcdMember]:
    """One member for the ``with`` block; stopped afterwards, and its process gone, whatever happens."""
    member = start_member(base)
    pid = member.pid
    assert pid is not None
    try:
        yield member
    finally:
        member.stop_sync()
        assert gone(pid)


@contextlib.contextmanager
def cluster_running(base: Path, members: int = 3) -> Iterator[LocalCluster]:
    """``members`` members on loopback for the ``with`` block; every process gone afterwards."""
    cluster = LocalCluster.loopback(base, members)
    run(cluster.start())
    pids = cluster.pids
    try:
        yield cluster
    finally:
        cluster.stop_sync()
        for pid in pids:
            assert gone(pid)
