"""Agents in a cluster, end to end: real etcd, real agents (processes), real TCG guests.

Ownership moves with a migration's commit and the destination resumes only with its token; a host
cut off from etcd starts nothing; a VM found running where it is not owned is fenced; limits queue
migrations; a migration whose coordinator died is taken over (by the source's agent when it comes
back, or by the destination's when the source host stays down)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hikkoshi.cluster.etcd_process import EtcdMember, free_ports
from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.migrate.phases import FINAL
from hikkoshi.vm.datastore import Datastore
from tests.support.agent_vms import create_busy, stop_and_verify, vm_names, wait_console
from tests.support.agents import AgentProc, agents, identify
from tests.support.cluster_peek import ClusterPeek
from tests.support.etcd import member_running
from tests.support.tcp_cut import TcpCut
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdMember]:
    with member_running(tmp_path / "etcd") as member:
        yield member


def api(agent: AgentProc, method: str, path: str, body: Any = None) -> httpx.Response:
    token = agent.token_file.read_text().strip()
    return httpx.request(
        method,
        f"{agent.url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
        verify=agent.verify(),  # the cluster CA: the token goes to no agent before its certificate checks out
    )


def uuid_of(agent: AgentProc, vm: str) -> str:
    info = agent.json("vm", "show", vm, "--json")
    return str(info["uuid"])


def wait_migration(agent: AgentProc, migration: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (info := agent.json("migrations", "show", migration, "--json"))["running"]:
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    return dict(info)


@pytest.mark.slow
def test_migration_by_host_name_moves_the_owner_key(
    guest: GuestImage, tmp_path: Path, etcd: EtcdMember
) -> None:
    need_qemu_tools()
    peek = ClusterPeek([etcd.spec.endpoint])
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "a", "b", extra=("--etcd", etcd.spec.endpoint)) as (a, b):
        assert {n for n, h in peek.hosts().items() if h.status is not None} == {"a", "b"}
        create_busy(a, "named", run)
        uuid = uuid_of(a, "named")
        owner = peek.owner(uuid)
        assert owner is not None and owner.host == "a"
        # An unknown host: a clear refusal, nothing starts.
        bad = a.cli("migrate", "named", "--to", "nosuch", "--json", check=False)
        assert bad.returncode == 2 and "no host named 'nosuch'" in bad.stderr, bad.stderr
        # Two callers migrate the VM at once: one wins, the other is told which migration runs.
        first = api(a, "POST", "/v1/vms/named/migrate", {"to": "b"})
        second = api(a, "POST", "/v1/vms/named/migrate", {"to": "b"})
        assert first.status_code == 202, first.text
        assert second.status_code == 409 and first.json()["id"] in second.text, second.text
        record = wait_migration(a, first.json()["id"])
        assert record["phase"] == "done", record
        moved = peek.owner(uuid)
        assert moved is not None and moved.host == "b" and moved.token > owner.token
        assert record["record"]["facts"]["fencing_token"] == moved.token
        job = peek.job(first.json()["id"]).record
        assert job.phase.value == "done" and job.source == "a" and job.destination == "b"
        assert [p for p, _t in job.history][:2] == ["precheck", "prepare-destination"]
        assert "resume-destination" in [p for p, _t in job.history]
        assert vm_names(b) == {"named": "running"} and vm_names(a) == {}
        peek.wait("b publishes the VM running", lambda: peek.hosts()["b"].status.vms.get(uuid) == "running")  # type: ignore[union-attr]
        # And back, by name again.
        back = b.json("migrate", "named", "--to", "a", "--json", timeout=600)
        assert back["phase"] == "done", back
        home = peek.owner(uuid)
        assert home is not None and home.host == "a" and home.token > moved.token
        mark = len(a.cli("vm", "console", "named").stdout)
        wait_console(a, "named", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(a, "named", run, mark)
        # Deleted: its owner key goes with it.
        a.cli("vm", "destroy", "named", "--yes")
        assert peek.owner(uuid) is None


@pytest.mark.slow
def test_fencing_start_and_adoption_follow_the_owner_key(
    guest: GuestImage, tmp_path: Path, etcd: EtcdMember
) -> None:
    """A host starts only what it owns; cut off from etcd it starts nothing but keeps its VMs running;
    a VM it finds running that another host owns is paused and marked fenced."""
    need_qemu_tools()
    peek = ClusterPeek([etcd.spec.endpoint])
    run = random.randrange(1, 2**31)
    with (
        TcpCut(("127.0.0.1", etcd.spec.client_port)) as link,
        agents(tmp_path, "a", extra=("--etcd", link.endpoint)) as (a,),
    ):
        a.cli("vm", "create", "fenced", "--memory", "128", "--disk", "16M", "--guest", "busy", "--no-nic",
              "--param", f"run={run}", "--param", "progress=4", "--param", "mb=8")  # fmt: skip
        uuid = uuid_of(a, "fenced")
        peek.move_owner(uuid, "b")  # as if a migration to b had committed
        refused = a.cli("vm", "start", "fenced", check=False)
        assert refused.returncode == 2 and "owned by host 'b'" in refused.stderr, refused.stderr
        assert vm_names(a) == {"fenced": "stopped"}
        peek.move_owner(uuid, "a")
        a.cli("vm", "start", "fenced", timeout=300)
        wait_console(a, "fenced", rf"PROGRESS run={run} ")
        # Cut off: the running VM runs on; nothing new is created or started.
        link.cut()
        time.sleep(4)  # the agent's lease keep-alive notices
        created = a.cli("vm", "create", "other", "--memory", "64", "--disk", "8M", "--no-nic", check=False)
        assert created.returncode != 0 and "etcd does not answer" in created.stderr, created.stderr
        assert vm_names(a) == {"fenced": "running"}
        mark = len(a.cli("vm", "console", "fenced").stdout)
        wait_console(a, "fenced", rf"PROGRESS run={run} ", after=mark)
        link.restore()
        peek.wait("a registered again", lambda: peek.hosts()["a"].status is not None)
        # The agent dies; meanwhile the owner key moves away; back, it pauses the VM it no longer owns.
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        peek.move_owner(uuid, "b")
        a.start()
        assert vm_names(a) == {"fenced": "fenced"}
        home = Datastore.open(a.datastores["main"]).home("fenced")
        assert asyncio.run(control.vm_status(home, home.load_spec()))["state"] == "paused"
        again = a.cli("vm", "start", "fenced", check=False)
        assert again.returncode != 0


def test_etcd_unreachable_at_start_is_a_clear_error(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    lonely = identify(AgentProc("lonely", tmp_path / "lonely", tmp_path / "token", {}), tmp_path)
    cmd = [sys.executable, "-m", "hikkoshi", "agent", "--name", "lonely", "--listen", "127.0.0.1:0",
           "--datastore", f"main={tmp_path / 'main'}", "--state-dir", str(tmp_path / "state"),
           "--token-file", str(tmp_path / "token"), *lonely.identity,
           "--etcd", f"127.0.0.1:{port}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "etcd" in done.stderr and f"127.0.0.1:{port}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_limits_queue_migrations_and_no_wait_refuses(
    guest: GuestImage, tmp_path: Path, etcd: EtcdMember
) -> None:
    """Three migrations started at once with one outgoing slot per host run one at a time (the others
    queued, with their place) and all complete; with --no-wait a fourth is refused."""
    need_qemu_tools()
    peek = ClusterPeek([etcd.spec.endpoint])
    peek.set_limits(host_out=1)
    with agents(tmp_path, "a", "b", extra=("--etcd", etcd.spec.endpoint)) as (a, b):
        names = ["q1", "q2", "q3", "q4"]
        for vm in names:
            a.cli("vm", "create", vm, "--memory", "128", "--disk", "8M", "--guest", "busy", "--no-nic",
                  "--param", "progress=4", "--param", "mb=8")  # fmt: skip
            if vm != "q4":  # q4 stays powered off: an offline migration takes a slot too
                a.cli("vm", "start", vm, timeout=300)
        ids = []
        for vm in names[:3]:
            r = api(a, "POST", f"/v1/vms/{vm}/migrate", {"to": "b"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        refused = api(a, "POST", "/v1/vms/q4/migrate", {"to": "b", "mode": "offline", "no_wait": True})
        assert refused.status_code == 202, refused.text
        places: set[int] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for i in ids:
                    with contextlib.suppress(Exception):
                        p = api(a, "GET", f"/v1/migrations/{i}").json().get("progress") or {}
                        if p.get("phase") == "queued":
                            places.add(int(p["place"]))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            infos = [wait_migration(a, i, timeout=600) for i in ids]
        finally:
            stop.set()
            watcher.join(5)
        assert [i["phase"] for i in infos] == ["done"] * 3, infos
        q4 = wait_migration(a, refused.json()["id"])
        assert q4["phase"] == "failed" and "refused" in (q4["error"] or ""), q4
        assert places and min(places) >= 1, places  # seen waiting, with a place in the queue
        # Never two at once: from etcd's histories, the spans (prepare .. final) do not overlap.
        spans = []
        for i in ids:
            history = peek.job(i).record.history
            start = next(t for p, t in history if p == "prepare-destination")
            end = next(t for p, t in history if p in {f.value for f in FINAL})
            spans.append((start, end))
        spans.sort()
        assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans)), spans
        assert vm_names(b) == {"q1": "running", "q2": "running", "q3": "running"}
        assert vm_names(a) == {"q4": "stopped"}


@pytest.mark.slow
def test_source_agent_dies_after_the_supervisor_commit_and_finishes_the_cluster_job(
    guest: GuestImage, tmp_path: Path, etcd: EtcdMember
) -> None:
    """The source's agent dies between the supervisor's commit and etcd's: the destination does not
    resume the VM on its own (the owner key still names the source and its copy is complete); the
    source's agent, back, takes the cluster job over (once the dead one's lease lapsed) and finishes."""
    need_qemu_tools()
    peek = ClusterPeek([etcd.spec.endpoint])
    run = random.randrange(1, 2**31)
    extra = ("--etcd", etcd.spec.endpoint, "--takeover-after", "2")
    with agents(tmp_path, "a", "b", extra=extra) as (a, b):
        create_busy(a, "halfway", run)
        uuid = uuid_of(a, "halfway")
        a.stop()
        a.env["HIKKOSHI_CRASH_AT"] = "migrate-resume-destination"
        a.start()
        died = a.cli("migrate", "halfway", "--to", "b", "--json", check=False, timeout=600)
        assert died.returncode == 3, died.stdout + died.stderr
        assert a.stop() == -signal.SIGKILL
        migration = peek.jobs()[-1].record.id
        owner = peek.owner(uuid)
        assert owner is not None and owner.host == "a"  # etcd's commit never happened
        time.sleep(12)  # a's host lease lapses (6 s) and b's take-over delay passes: b must not act
        assert peek.owner(uuid) == owner
        assert api(b, "GET", "/v1/vms/halfway").json()["state"] == "incoming"  # not resumed
        a.env.pop("HIKKOSHI_CRASH_AT")
        a.start()
        info = wait_migration(a, migration)
        assert info["phase"] == "done", info
        moved = peek.owner(uuid)
        assert moved is not None and moved.host == "b"
        view = peek.job(migration)
        assert view.record.phase.value == "done" and view.coordinator is None
        assert vm_names(b) == {"halfway": "running"} and vm_names(a) == {}
        mark = len(b.cli("vm", "console", "halfway").stdout)
        wait_console(b, "halfway", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(b, "halfway", run, mark)


@pytest.mark.slow
def test_destination_finishes_a_committed_migration_when_the_source_host_stays_down(
    guest: GuestImage, tmp_path: Path, etcd: EtcdMember
) -> None:
    """The source's agent dies right after etcd recorded the commit (the owner key names the
    destination), before the destination resumed: the source host stays down, so the destination's
    agent takes the job over and finishes it with the owner token. When the source comes back it cleans
    up its side."""
    need_qemu_tools()
    peek = ClusterPeek([etcd.spec.endpoint])
    run = random.randrange(1, 2**31)
    extra = ("--etcd", etcd.spec.endpoint, "--takeover-after", "2")
    with agents(tmp_path, "a", "b", extra=extra) as (a, b):
        create_busy(a, "orphan", run)
        uuid = uuid_of(a, "orphan")
        a.stop()
        a.env["HIKKOSHI_CRASH_AT"] = "migrate-ledger-committed"
        a.start()
        died = a.cli("migrate", "orphan", "--to", "b", "--json", check=False, timeout=600)
        assert died.returncode == 3, died.stdout + died.stderr
        assert a.stop() == -signal.SIGKILL
        migration = peek.jobs()[-1].record.id
        owner = peek.owner(uuid)
        assert owner is not None and owner.host == "b"
        peek.wait("b finishes the migration", lambda: peek.job(migration).record.phase.value == "done", 90)
        assert "finished by its destination b" in (peek.job(migration).record.error or "")
        assert vm_names(b) == {"orphan": "running"}
        mark = len(b.cli("vm", "console", "orphan").stdout)
        wait_console(b, "orphan", rf"PROGRESS run={run} ", after=mark)
        # The source comes back: its record goes forward (it is committed), its side is cleaned up.
        a.env.pop("HIKKOSHI_CRASH_AT")
        a.start()
        info = wait_migration(a, migration)
        assert info["phase"] == "done", info
        assert vm_names(a) == {} and not (a.datastores["main"] / "orphan").exists()
        assert peek.owner(uuid) == owner
        stop_and_verify(b, "orphan", run, mark)


@pytest.mark.slow
def test_destination_rolls_back_when_the_source_host_stays_down_before_the_commit(
    guest: GuestImage, tmp_path: Path, etcd: EtcdMember
) -> None:
    """The source's agent dies mid-memory-copy and stays away: the source's supervisor resumes the guest
    there (its guard fired), the destination's agent rolls the cluster job back and drops its copy. The
    source's agent, back, finds the job settled and its VM running."""
    need_qemu_tools()
    peek = ClusterPeek([etcd.spec.endpoint])
    run = random.randrange(1, 2**31)
    extra = ("--etcd", etcd.spec.endpoint, "--takeover-after", "2")
    with agents(tmp_path, "a", "b", extra=extra) as (a, b):
        create_busy(a, "stayer", run)
        uuid = uuid_of(a, "stayer")
        a.stop()
        a.env["HIKKOSHI_CRASH_AT"] = "migrate-memory-precopy"
        a.start()
        died = a.cli("migrate", "stayer", "--to", "b", "--json", check=False, timeout=600)
        assert died.returncode == 3, died.stdout + died.stderr
        assert a.stop() == -signal.SIGKILL
        migration = peek.jobs()[-1].record.id
        peek.wait(
            "b rolls the migration back", lambda: peek.job(migration).record.phase.value == "rolled-back", 90
        )
        assert vm_names(b) == {}
        owner = peek.owner(uuid)
        assert owner is not None and owner.host == "a"
        a.env.pop("HIKKOSHI_CRASH_AT")
        a.start()
        info = wait_migration(a, migration)
        assert info["phase"] == "rolled-back", info
        assert vm_names(a) == {"stayer": "running"}
        mark = len(a.cli("vm", "console", "stayer").stdout)
        wait_console(a, "stayer", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(a, "stayer", run, mark)
