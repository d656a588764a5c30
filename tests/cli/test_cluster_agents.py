"""The CLI with ``--etcd`` against real agents (members of one etcd) and real guests: hosts and VMs
listed from etcd, VM commands on whichever host owns the VM, migrations by host name with their
queue, and a host that dies.

One etcd member and two agents (alpha, beta) serve the whole module; guests are the ``idle`` workload
(they boot in seconds under TCG). Most commands run the CLI's ``main`` in this process; concurrent
migrations run as commands of their own.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.cluster.etcd_process import EtcdMember
from hikkoshi.guest.guest_image import GuestImage
from tests.support.agents import AgentProc, identify
from tests.support.cluster_cli import ClusterCli, Result, in_process, wait_for
from tests.support.etcd_agents import cluster_cli, etcd_agents
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools

CapSys = pytest.CaptureFixture[str]
SMALL_VM = ("--guest", "idle", "--no-nic", "--memory", "128", "--disk", "16M")


@dataclass
class Cluster:
    etcd: EtcdMember
    url: str
    alpha: AgentProc
    beta: AgentProc
    root: Path

    @property
    def token_file(self) -> Path:
        return self.alpha.token_file

    def cli(self) -> ClusterCli:
        return ClusterCli(self.url, self.token_file, self.alpha.ca_file)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, guest: GuestImage) -> Iterator[Cluster]:
    need_qemu_tools()
    root = tmp_path_factory.mktemp("cluster")
    with etcd_agents(root, "alpha", "beta") as (member, url, (a, b)):
        yield Cluster(member, url, a, b, root)


def hk(capsys: CapSys, c: Cluster, *args: str) -> Result:
    """``hikkoshi --etcd URL --token-file F --ca-file F ARGS``, in this process."""
    return cluster_cli(capsys, c.url, c.alpha, *args)


def _ca(agent: AgentProc) -> list[str]:
    return ["--ca-file", str(agent.ca_file)] if agent.ca_file else []


def ok(capsys: CapSys, c: Cluster, *args: str) -> str:
    r = hk(capsys, c, *args)
    assert r.code == 0, r
    return r.out


def as_json(capsys: CapSys, c: Cluster, *args: str) -> Any:
    return json.loads(ok(capsys, c, *args, "--json"))


def vms(capsys: CapSys, c: Cluster) -> dict[str, tuple[str | None, str]]:
    """VM name -> (host, state), from etcd."""
    return {v["name"]: (v["host"], v["state"]) for v in as_json(capsys, c, "vm", "list")}


def agent_vms(capsys: CapSys, agent: AgentProc) -> list[str]:
    """The VMs an agent has (asked directly, not through the cluster)."""
    direct = ["--agent", agent.url, "--token-file", str(agent.token_file), *_ca(agent)]
    r = in_process(capsys, *direct, "vm", "list", "--json")
    assert r.code == 0, r
    return [v["name"] for v in json.loads(r.out)]


def until_vms(capsys: CapSys, c: Cluster, expected: dict[str, tuple[str | None, str]]) -> None:
    """Until ``vm list`` shows these VMs so (hosts publish their VMs' states every few seconds)."""
    wait_for(
        f"vm list {expected}", lambda: {k: v for k, v in vms(capsys, c).items() if k in expected} == expected
    )


def test_hosts_are_listed_up(capsys: CapSys, cluster: Cluster) -> None:
    hosts = {h["name"]: h for h in as_json(capsys, cluster, "host", "list")}
    assert set(hosts) == {"alpha", "beta"}
    for name, agent in (("alpha", cluster.alpha), ("beta", cluster.beta)):
        h = hosts[name]
        assert h["state"] == "up" and h["api_address"] == agent.url and h["site"] == "default"
        assert 0 < h["memory_free"] <= h["memory_total"] and h["vms_running"] == 0 and h["cpu"] is not None
        assert h["migrations_in"] == 0 and h["migrations_out"] == 0 and h["datastores"][0]["name"] == "main"
    table = ok(capsys, cluster, "host", "list").splitlines()
    assert table[0].split()[:4] == ["NAME", "STATE", "SITE", "VMS"]
    assert re.match(r"alpha\s+up\s+default\s+0/0\s", table[1]) and cluster.alpha.url in table[1]
    shown = ok(capsys, cluster, "host", "show", "beta")
    assert "state        up" in shown and f"API          {cluster.beta.url}" in shown


def test_vm_commands_go_to_the_owner(capsys: CapSys, cluster: Cluster) -> None:
    a, b = cluster.alpha, cluster.beta
    assert "created VM 'web'" in ok(capsys, cluster, "vm", "create", "web", "--host", "alpha", *SMALL_VM)
    ok(capsys, cluster, "vm", "create", "db", "--host", "beta", *SMALL_VM)
    # Names are the cluster's: another host cannot take one.
    r = hk(capsys, cluster, "vm", "create", "web", "--host", "beta", *SMALL_VM)
    assert r.code == 2 and "exists in the cluster already" in r.err
    until_vms(capsys, cluster, {"web": ("alpha", "stopped"), "db": ("beta", "stopped")})
    listed = {v["name"]: v for v in as_json(capsys, cluster, "vm", "list")}
    assert listed["web"]["memory"] == 128 << 20 and listed["web"]["vcpus"] == 1 and listed["web"]["uuid"]
    # Started, shown, stopped and deleted on alpha, named only.
    ok(capsys, cluster, "vm", "start", "web")
    assert agent_vms(capsys, a) == ["web"]
    assert as_json(capsys, cluster, "vm", "show", "web")["state"] == "running"
    until_vms(capsys, cluster, {"web": ("alpha", "running")})
    wait_for("web's console", lambda: "HIKKOSHI-INIT start" in ok(capsys, cluster, "vm", "console", "web"))
    ok(capsys, cluster, "vm", "stop", "web", "--hard")
    until_vms(capsys, cluster, {"web": ("alpha", "stopped")})
    r = hk(capsys, cluster, "vm", "delete", "web")
    assert r.code == 2 and "add --yes" in r.err
    assert ok(capsys, cluster, "vm", "delete", "web", "--yes") == "deleted VM 'web'\n"
    assert ok(capsys, cluster, "vm", "destroy", "db", "--yes") == "destroyed VM 'db'\n"
    assert vms(capsys, cluster) == {}
    assert agent_vms(capsys, a) == [] and agent_vms(capsys, b) == []


def test_migrate_by_host_name(capsys: CapSys, cluster: Cluster) -> None:
    ok(capsys, cluster, "vm", "create", "mover", "--host", "alpha", *SMALL_VM)
    ok(capsys, cluster, "vm", "start", "mover")
    r = hk(capsys, cluster, "migrate", "mover", "--to", "nowhere")
    assert r.code == 2 and "no host named 'nowhere' in the cluster" in r.err
    r = hk(capsys, cluster, "migrate", "mover", "--to", "alpha")
    assert r.code == 2 and "is on host 'alpha' already" in r.err
    record = as_json(capsys, cluster, "migrate", "mover", "--to", "beta")
    assert record["phase"] == "done" and record["role"] == "source", record
    until_vms(capsys, cluster, {"mover": ("beta", "running")})
    assert agent_vms(capsys, cluster.beta) == ["mover"]
    # The cluster's record of it, from etcd, with the agent's report on demand.
    rows = wait_for(
        "the migration recorded done, uncoordinated",
        lambda: [
            m
            for m in as_json(capsys, cluster, "migrations")["migrations"]
            if m["id"] == record["id"] and m["coordinator"] is None
        ],
    )
    m = rows[0]
    assert (m["vm"], m["source"], m["destination"], m["phase"], m["error"]) == (
        "mover",
        "alpha",
        "beta",
        "done",
        None,
    )
    assert "host-out:alpha" in m["resources"] and "host-in:beta" in m["resources"]
    table = ok(capsys, cluster, "migrations")
    assert re.search(rf"{record['id']}\s+mover\s+alpha\s+beta\s+done\s+none\s+\d+[smh]", table)
    shown = ok(capsys, cluster, "migrations", "show", record["id"])
    assert f"migration {record['id']}: VM mover (" in shown and "alpha -> beta: done" in shown
    assert f"migration {record['id']}: VM mover, storage hybrid: done" in shown  # the agent's report
    detail = as_json(capsys, cluster, "migrations", "show", record["id"])
    assert detail["cluster"]["phase"] == "done" and detail["agent"]["phase"] == "done"


def test_queue_and_no_wait(capsys: CapSys, cluster: Cluster) -> None:
    ok(capsys, cluster, "limits", "set", "host-out=1")
    procs: list[subprocess.Popen[str]] = []
    try:
        for vm in ("q1", "q2"):
            ok(capsys, cluster, "vm", "create", vm, "--host", "alpha", *SMALL_VM)
            ok(capsys, cluster, "vm", "start", vm)
        cli = cluster.cli()
        # q1 moves slowly (its memory stream limited): it holds alpha's one outgoing slot meanwhile.
        procs.append(cli.start("migrate", "q1", "--to", "beta", "--bandwidth", "4M"))

        def holders() -> list[str]:
            shown = as_json(capsys, cluster, "limits", "show")
            return [h for r in shown["resources"] if r["resource"] == "host-out:alpha" for h in r["holders"]]

        (first,) = wait_for("q1 to hold host-out:alpha", holders)
        r = hk(capsys, cluster, "migrate", "q2", "--to", "beta", "--no-wait")
        assert r.code == 2 and f"refused: host-out:alpha: 1/1 slots held by {first}" in r.out, r
        # Without --no-wait q2 queues, shown by migrations and limits, then runs when q1 is done.
        procs.append(cli.start("migrate", "q2", "--to", "beta"))
        listed = wait_for("q2 queued", lambda: as_json(capsys, cluster, "migrations")["queue"])
        assert listed[0]["place"] == 1 and listed[0]["vm"] == "q2"
        assert listed[0]["reasons"] == [f"host-out:alpha: 1/1 slots held by {first}"]
        queued = [
            m for m in as_json(capsys, cluster, "migrations")["migrations"] if m["id"] == listed[0]["job"]
        ]
        assert queued and queued[0]["phase"] in ("queued", "precheck")  # precheck: admitted meanwhile
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert f"migrate: queued (place 1: host-out:alpha: 1/1 slots held by {first})" in outs[1][0]
        assert "storage hybrid: done" in outs[1][0]
        until_vms(capsys, cluster, {"q1": ("beta", "running"), "q2": ("beta", "running")})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        ok(capsys, cluster, "limits", "set", "host-out=default")


def test_a_host_killed_is_down_and_its_vms_unknown(capsys: CapSys, cluster: Cluster) -> None:
    gamma = identify(
        AgentProc(
            "gamma",
            cluster.root / "gamma",
            cluster.token_file,
            {"main": cluster.root / "gamma" / "main"},
            ["--etcd", cluster.url],
        ),
        cluster.root,
    )
    try:
        gamma.start()
        ok(capsys, cluster, "vm", "create", "left", "--host", "gamma", *SMALL_VM)
        until_vms(capsys, cluster, {"left": ("gamma", "stopped")})
        gamma.stop(signal.SIGKILL)  # no goodbye: its lease (6 s) lapses

        def gamma_state() -> str | None:
            states = {h["name"]: h["state"] for h in as_json(capsys, cluster, "host", "list")}
            return states["gamma"] if states["gamma"] == "down" else None

        wait_for("gamma down", gamma_state, timeout=30)
        assert vms(capsys, cluster)["left"] == ("gamma", "unknown")
        assert re.search(r"gamma\s+down\s+default\s+-\s", ok(capsys, cluster, "host", "list"))
        for args in (("vm", "start", "left"), ("migrate", "left", "--to", "alpha")):
            r = hk(capsys, cluster, *args)
            assert r.code == 3 and "VM 'left' is on host 'gamma', which is down" in r.err, r
        r = hk(capsys, cluster, "vm", "create", "other", "--host", "gamma", *SMALL_VM)
        assert r.code == 3 and "host 'gamma' is down" in r.err
    finally:
        gamma.stop(signal.SIGKILL)
        gamma.kill_vms()
        if gamma.state_root is not None:
            shutil.rmtree(gamma.state_root, ignore_errors=True)
