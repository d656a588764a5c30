"""`hikkoshi cluster up|down|status`: the embedded etcd as a user runs it, detached or in the foreground;
every process it starts is found by pid and gone at the end, and nothing is left listening."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hikkoshi.cluster.etcd_process import free_ports
from hikkoshi.cluster.etcd_supervisor import PidFile, SupervisorInfo, stop_supervisor
from tests.support.cluster_cli import clean_env, hikkoshi_cmd, in_process, process_gone, wait_for

CapSys = pytest.CaptureFixture[str]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose supervisor and etcd, if any are left, are stopped by pid after the test."""
    path = tmp_path / "state"
    seen: list[SupervisorInfo] = []
    yield path
    info = PidFile(path).read()
    if info is not None:
        seen.append(info)
    stop_supervisor(path, within=10)
    for i in seen:
        for p in (i.supervisor, i.etcd):
            if p is not None and p.alive():
                os.kill(p.pid, signal.SIGKILL)


def up(state_dir: Path, port: int, peer: int, *more: str) -> subprocess.CompletedProcess[str]:
    argv = [
        "cluster",
        "up",
        "--state-dir",
        str(state_dir),
        "--listen",
        f"127.0.0.1:{port}",
        "--peer-port",
        str(peer),
    ]
    return subprocess.run(
        hikkoshi_cmd(*argv, *more), capture_output=True, text=True, timeout=120, check=False, env=clean_env()
    )


def test_up_detached_status_restart_down(capsys: CapSys, state_dir: Path) -> None:
    port, peer = free_ports(2)
    done = up(state_dir, port, peer, "--detach")
    assert done.returncode == 0, done
    assert done.stdout.splitlines()[-1] == f"export HIKKOSHI_ETCD=http://127.0.0.1:{port}"
    info = PidFile(state_dir).read()
    assert info is not None and info.etcd is not None and info.endpoint == f"127.0.0.1:{port}"
    assert info.supervisor.alive() and info.etcd.alive() and (state_dir / "etcd").is_dir()

    r = in_process(capsys, "cluster", "status", "--state-dir", str(state_dir), "--json")
    status = json.loads(r.out)
    assert r.code == 0 and status["healthy"] and status["leader"] == "hikkoshi"
    assert status["supervisor"] == {
        "pid": info.supervisor.pid,
        "etcd_pid": info.etcd.pid,
        "endpoint": info.endpoint,
    }
    r = in_process(capsys, "--etcd", f"http://127.0.0.1:{port}", "cluster", "status")
    assert r.code == 0 and "cluster    healthy, leader hikkoshi" in r.out and "hosts 0 (0 up)" in r.out

    # A second one on the same state dir is refused.
    other, other_peer = free_ports(2)
    again = up(state_dir, other, other_peer)
    assert again.returncode == 2 and "a cluster is already up under" in again.stderr

    # etcd dies: the supervisor starts it again.
    os.kill(info.etcd.pid, signal.SIGKILL)

    def restarted() -> SupervisorInfo | None:
        now = PidFile(state_dir).read()
        return now if now is not None and now.etcd is not None and now.etcd != info.etcd else None

    after = wait_for("etcd restarted", restarted, timeout=60)
    assert after.supervisor == info.supervisor
    r = in_process(capsys, "cluster", "status", "--state-dir", str(state_dir))
    assert r.code == 0, r

    r = in_process(capsys, "cluster", "down", "--state-dir", str(state_dir))
    assert r.code == 0 and f"stopped etcd at 127.0.0.1:{port}" in r.out
    assert after.etcd is not None
    for pid in (info.supervisor.pid, info.etcd.pid, after.etcd.pid):
        assert process_gone(pid)
    assert not listening(port) and not listening(peer) and PidFile(state_dir).read() is None
    r = in_process(capsys, "cluster", "down", "--state-dir", str(state_dir))
    assert r.code == 0 and "no cluster is up under" in r.out
    r = in_process(capsys, "cluster", "status", "--state-dir", str(state_dir))
    assert r.code == 3 and "no cluster is up under" in r.err


def test_up_in_the_foreground_stops_on_sigterm(state_dir: Path) -> None:
    port, peer = free_ports(2)
    argv = [
        "cluster",
        "up",
        "--state-dir",
        str(state_dir),
        "--listen",
        f"127.0.0.1:{port}",
        "--peer-port",
        str(peer),
    ]
    proc = subprocess.Popen(
        hikkoshi_cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[2] == f"export HIKKOSHI_ETCD=http://127.0.0.1:{port}\n", (lines, proc.stderr)
        info = PidFile(state_dir).read()
        assert info is not None and info.supervisor.pid == proc.pid and info.etcd is not None
        assert listening(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert process_gone(info.etcd.pid) and not listening(port) and PidFile(state_dir).read() is None
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


def test_up_refusals(capsys: CapSys, state_dir: Path) -> None:
    r = in_process(capsys, "cluster", "up", "--state-dir", str(state_dir), "--listen", "0.0.0.0:2379")
    assert r.code == 2 and "loopback only" in r.err
    r = in_process(capsys, "cluster", "status")
    assert r.code == 2 and "which cluster?" in r.err
    # A port already taken: said at once, nothing left behind.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        (peer,) = free_ports(1)
        done = up(state_dir, port, peer)
    assert done.returncode == 2 and "already in use" in done.stderr, done
    assert PidFile(state_dir).read() is None
