"""Agents on a three-member etcd cluster: the leader dies mid-migration, twice (during the memory copy,
and after the commit while the disk is still being pulled); each migration goes on, the owner key ends
on the host that runs the VM, and the VM runs in exactly one place with every record it wrote."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hikkoshi.cluster.etcd_process import LocalCluster
from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.migrate.phases import FINAL, Phase
from tests.support.agent_vms import create_busy, stop_and_verify, vm_names, wait_console
from tests.support.agents import AgentProc, agents
from tests.support.cluster_peek import ClusterPeek
from tests.support.etcd import cluster_running, run
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[LocalCluster]:
    with cluster_running(tmp_path / "etcd3", 3) as cluster:
        yield cluster


def kill_leader_at(cluster: LocalCluster, peek: ClusterPeek, job_id: str, phases: set[Phase]) -> Phase:
    """Wait until the job (as etcd records it) reaches one of ``phases``, then kill the etcd leader;
    the phase it was in. The job must not have ended first (else the kill proves nothing)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        phase = peek.job(job_id).record.phase
        assert phase not in FINAL, f"the migration ended ({phase}) before the leader could be killed"
        if phase in phases:
            cluster.members[run(cluster.leader())].kill()
            return phase
        time.sleep(0.05)
    raise AssertionError(f"the migration never reached {phases}")


def migrate_and_kill(
    cluster: LocalCluster,
    peek: ClusterPeek,
    source: AgentProc,
    uuid: str,
    to: str,
    storage: str,
    phases: set[Phase],
) -> tuple[Phase, dict[str, object]]:
    """Start a migration through the CLI (in a thread: it waits for the end), kill the leader at one of
    ``phases``; the phase of the kill and the final record."""
    out: dict[str, object] = {}

    def go() -> None:
        out.update(source.json("migrate", "vm1", "--to", to, "--storage", storage, "--json", timeout=900))

    worker = threading.Thread(target=go)
    worker.start()
    try:

        def running() -> list[str]:
            return [j.record.id for j in peek.jobs() if j.record.vm == uuid and j.record.phase not in FINAL]

        peek.wait("the job in etcd", lambda: bool(running()), timeout=120)
        job_id = running()[0]
        killed = kill_leader_at(cluster, peek, job_id, phases)
    finally:
        worker.join(900)
    assert not worker.is_alive()
    return killed, out


@pytest.mark.slow
def test_leader_killed_mid_migration_twice(guest: GuestImage, tmp_path: Path, cluster3: LocalCluster) -> None:
    need_qemu_tools()
    endpoints = ",".join(cluster3.endpoints)
    peek = ClusterPeek(cluster3.endpoints)
    vm_run = random.randrange(1, 2**31)
    with agents(tmp_path, "a", "b", extra=("--etcd", endpoints)) as (a, b):
        create_busy(a, "vm1", vm_run)
        uuid = str(a.json("vm", "show", "vm1", "--json")["uuid"])
        first = peek.owner(uuid)
        assert first is not None and first.host == "a"

        # 1. Before the commit point: the leader dies while memory is copied.
        killed, record = migrate_and_kill(
            cluster3, peek, a, uuid, "b", "precopy", {Phase.STORAGE_PRE, Phase.MEMORY}
        )
        assert killed in {Phase.STORAGE_PRE, Phase.MEMORY}
        assert record["phase"] == "done", record
        moved = peek.owner(uuid)
        assert moved is not None and moved.host == "b" and moved.token > first.token
        assert vm_names(b) == {"vm1": "running"} and vm_names(a) == {}
        mark = len(b.cli("vm", "console", "vm1").stdout)
        wait_console(b, "vm1", rf"PROGRESS run={vm_run} ", after=mark)

        # The dead member back (a cluster of three again), then: after the commit, while the disk is
        # still being pulled to a (hybrid), the new leader dies.
        dead = next(i for i, m in enumerate(cluster3.members) if not m.running)
        run(cluster3.restart(dead))
        killed, record = migrate_and_kill(
            cluster3, peek, b, uuid, "a", "hybrid", {Phase.RESUME, Phase.ANNOUNCE, Phase.STORAGE_POST}
        )
        assert record["phase"] == "done", record
        home = peek.owner(uuid)
        assert home is not None and home.host == "a" and home.token > moved.token
        assert vm_names(a) == {"vm1": "running"} and vm_names(b) == {}
        job = next(j for j in peek.jobs() if j.record.id == record["id"]).record
        assert job.phase is Phase.DONE
        mark = len(a.cli("vm", "console", "vm1").stdout)
        wait_console(a, "vm1", rf"PROGRESS run={vm_run} ", after=mark)
        stop_and_verify(a, "vm1", vm_run, mark)
