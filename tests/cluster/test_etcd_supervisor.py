"""The embedded etcd's supervisor: restarts a member that dies, gives up after too many deaths, stops it
cleanly, and a pid file that never names a reused pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from hikkoshi.cluster.errors import EtcdProcessError
from hikkoshi.cluster.etcd_process import EtcdMember, free_ports
from hikkoshi.cluster.etcd_supervisor import (
    AlreadyRunning,
    PidFile,
    ProcessId,
    Supervisor,
    state_dir_lock,
    stop_supervisor,
)
from tests.support.etcd import gone, run


def test_process_ids_and_the_pid_file(tmp_path: Path) -> None:
    me = ProcessId.of(os.getpid())
    assert me is not None and me.alive()
    assert not ProcessId(os.getpid(), me.start + 1).alive()  # the same pid, another process
    assert ProcessId.of(2**22 + 1) is None
    pid_file = PidFile(tmp_path)
    assert pid_file.read() is None and stop_supervisor(tmp_path) is None
    (tmp_path / "cluster.pid").write_text("{not json")
    assert pid_file.read() is None
    with state_dir_lock(tmp_path), pytest.raises(AlreadyRunning), state_dir_lock(tmp_path):
        pass


def test_restarts_a_dying_member_then_gives_up(tmp_path: Path) -> None:
    client, peer = free_ports(2)
    member = EtcdMember.single(tmp_path, client_port=client, peer_port=peer)
    pid_file = PidFile(tmp_path)
    seen: list[int] = []

    async def kill_when_up(previous: int | None) -> int:
        while True:
            info = pid_file.read()
            if info is not None and info.etcd is not None and info.etcd.pid != previous:
                seen.append(info.etcd.pid)
                os.kill(info.etcd.pid, signal.SIGKILL)
                return info.etcd.pid
            await asyncio.sleep(0.05)

    async def main() -> None:
        supervisor = Supervisor(member, pid_file, max_restarts=1, pause=0.1)
        task = asyncio.create_task(supervisor.run(asyncio.Event()))
        first = await kill_when_up(None)
        await kill_when_up(first)  # restarted once: killed again, one death too many
        with pytest.raises(EtcdProcessError, match="died 2 times"):
            await asyncio.wait_for(task, 60)

    try:
        run(main())
        assert len(seen) == 2 and all(gone(p) for p in seen)
        assert not member.running and pid_file.read() is None
    finally:
        member.stop_sync()


def test_stops_cleanly_when_asked(tmp_path: Path) -> None:
    client, peer = free_ports(2)
    member = EtcdMember.single(tmp_path, client_port=client, peer_port=peer)
    pid_file = PidFile(tmp_path)

    async def main() -> int:
        stop = asyncio.Event()
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        supervisor = Supervisor(member, pid_file, on_ready=lambda m: ready.set_result(m.pid or 0))
        task = asyncio.create_task(supervisor.run(stop))
        pid = await asyncio.wait_for(ready, 60)
        info = pid_file.read()
        assert info is not None and info.etcd is not None and info.etcd.pid == pid
        assert info.supervisor.pid == os.getpid() and info.endpoint == f"127.0.0.1:{client}"
        stop.set()
        await asyncio.wait_for(task, 30)
        return pid

    try:
        pid = run(main())
        assert gone(pid) and pid_file.read() is None
    finally:
        with contextlib.suppress(Exception):
            member.stop_sync()
