"""DRS with real agents, a real etcd and real guests: load figures in etcd, the prediction of a
migration (``migrate --dry-run``), placement of a new VM, ``drs plan|apply`` spreading VMs created on
one host, an anti-affinity rule separating two VMs, maintenance emptying a host while a guest keeps
writing and verifying its disk, and a scheduled migration running at its time, once.

One etcd member and three agents (alpha, beta, gamma) serve the module, each counting 512 MiB for VMs
and sampling its VMs every second over a window of 5 samples; the tests run in order and share them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hikkoshi.cluster.etcd_process import EtcdMember
from hikkoshi.guest.guest_image import GuestImage
from tests.support.agent_vms import create_busy, stop_and_verify
from tests.support.agents import AgentProc
from tests.support.cluster_cli import Result, wait_for
from tests.support.cluster_peek import ClusterPeek
from tests.support.etcd_agents import cluster_cli, etcd_agents
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools

CapSys = pytest.CaptureFixture[str]
SMALL_VM = ("--guest", "idle", "--no-nic", "--memory", "128", "--disk", "16M")
DRS_AGENT = ("--vm-memory", "512M", "--load-interval", "1", "--load-window", "5", "--drs-tick", "0.5")


@dataclass
class Cluster:
    etcd: EtcdMember
    url: str
    agents: dict[str, AgentProc]
    peek: ClusterPeek


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, guest: GuestImage) -> Iterator[Cluster]:
    need_qemu_tools()
    with etcd_agents(tmp_path_factory.mktemp("drs"), "alpha", "beta", "gamma", extra=DRS_AGENT) as got:
        member, url, procs = got
        yield Cluster(member, url, {p.name: p for p in procs}, ClusterPeek([member.spec.endpoint]))


def hk(capsys: CapSys, c: Cluster, *args: str) -> Result:
    return cluster_cli(capsys, c.url, c.agents["alpha"], *args)


def ok(capsys: CapSys, c: Cluster, *args: str) -> str:
    r = hk(capsys, c, *args)
    assert r.code == 0, r
    return r.out


def as_json(capsys: CapSys, c: Cluster, *args: str) -> Any:
    return json.loads(ok(capsys, c, *args, "--json"))


def hosts_of(capsys: CapSys, c: Cluster) -> dict[str, str | None]:
    """VM name -> its host, from etcd."""
    return {v["name"]: v["host"] for v in as_json(capsys, c, "vm", "list")}


def sampled(c: Cluster, names: list[str], samples: int = 4) -> None:
    """Until the VMs run and their owners publish at least ``samples`` load samples of each."""

    def check() -> bool:
        hosts = c.peek.hosts()
        seen = {}
        for h in hosts.values():
            st = h.status
            if st is None:
                continue
            for uuid, load in st.vm_loads.items():
                seen[uuid] = len(load.cpu) >= samples and st.vms.get(uuid) == "running"
        uuids = {v.vm.name: v.vm.uuid for v in _vms(c)}
        return all(seen.get(uuids.get(n, ""), False) for n in names)

    wait_for(f"load figures of {names}", check, timeout=120)


def _vms(c: Cluster) -> list[Any]:
    from hikkoshi.cluster.ownership import Ownership

    return c.peek._run(lambda store: Ownership(store).list_vms())


def start_small(capsys: CapSys, c: Cluster, name: str, host: str) -> None:
    ok(capsys, c, "vm", "create", name, "--host", host, *SMALL_VM)
    ok(capsys, c, "vm", "start", name)


def test_spread_by_drs_apply(capsys: CapSys, cluster: Cluster) -> None:
    c = cluster
    # Placement: a new VM goes to a host, and the command says which and why.
    placed = ok(capsys, c, "vm", "create", "placed", *SMALL_VM)
    assert "placed on" in placed and "least loaded" in placed
    ok(capsys, c, "vm", "delete", "placed", "--yes")
    for name in ("s1", "s2", "s3"):
        start_small(capsys, c, name, "alpha")
    sampled(c, ["s1", "s2", "s3"])
    # The figures in etcd: CPU from QEMU's threads, resident memory, the disk service's I/O.
    alpha = c.peek.hosts()["alpha"].status
    assert alpha is not None and alpha.vm_memory == 512 << 20 and alpha.cpu_cores >= 1
    load = next(iter(alpha.vm_loads.values()))
    assert all(x >= 0 for x in load.cpu) and all(m > 0 for m in load.memory) and load.datastore

    # Each guest's dirty rate, measured by QEMU (calc-dirty-rate) every few samples.
    def dirty_rates() -> bool:
        st = c.peek.hosts()["alpha"].status
        return st is not None and all(x.dirty_rate is not None for x in st.vm_loads.values())

    wait_for("dirty rates", dirty_rates, timeout=30)
    # The prediction: nothing moves. No migration measured the link yet: it is assumed.
    dry = as_json(capsys, c, "migrate", "s1", "--to", "beta", "--dry-run")
    p = dry["predicted"]
    assert p["total_time_ms"] > 0 and p["downtime_ms"] > 0 and p["bytes"] > 0, dry
    assert dry["assumptions"]["link"] == "assumed" and dry["assumptions"]["dirty_rate"] >= 0, dry
    assert dry["from"] == "alpha" and dry["to"] == "beta" and dry["storage"] == "hybrid"
    assert "total time" in ok(capsys, c, "migrate", "s1", "--to", "beta", "--dry-run")
    assert hosts_of(capsys, c)["s1"] == "alpha"
    # The plan: moves off alpha, each with its reason (once the guests' boot is out of the window:
    # balancing rests only on stable loads).
    wait_for("a plan with moves", lambda: as_json(capsys, c, "drs", "plan")["moves"], timeout=90)
    plan = as_json(capsys, c, "drs", "plan")
    assert plan["moves"] and plan["imbalance_after"] < plan["imbalance_before"], plan
    for m in plan["moves"]:
        assert m["from"] == "alpha" and m["to"] in ("beta", "gamma") and m["reason"] and m["vm"]
    table = ok(capsys, c, "drs", "plan")
    assert "DRS plan at level 3" in table and "REASON" in table
    # Applied: through migration jobs, the VMs spread.
    applied = hk(capsys, c, "drs", "apply")
    assert applied.code == 0, applied
    assert "move(s) done" in applied.out and "-> done" not in applied.err
    where = hosts_of(capsys, c)
    spread = [where[n] for n in ("s1", "s2", "s3")]
    assert len(set(spread)) >= 2 and spread.count("alpha") < 3, where
    # Every migration report carries its prediction beside what happened.
    done = [m for m in as_json(capsys, c, "migrations")["migrations"] if m["phase"] == "done"]
    assert done
    report = as_json(capsys, c, "migrations", "show", done[0]["id"])["agent"]["record"]["report"]
    assert report["predicted"]["total_time_ms"] > 0 and report["predicted"]["bytes"] > 0, report
    assert report["elapsed_s"] > 0


def test_anti_affinity_separates(capsys: CapSys, cluster: Cluster) -> None:
    c = cluster
    start_small(capsys, c, "x1", "beta")
    start_small(capsys, c, "x2", "beta")
    sampled(c, ["x1", "x2"], samples=2)
    r = hk(capsys, c, "rule", "add", "apart", "--anti-affinity", "x1,nosuch")
    assert r.code == 2 and "nosuch" in r.err
    assert "rule 'apart' added" in ok(capsys, c, "rule", "add", "apart", "--anti-affinity", "x1,x2")
    assert hk(capsys, c, "rule", "add", "apart", "--affinity", "x1,x2").code == 2
    rules = as_json(capsys, c, "rule", "list")
    assert [r["name"] for r in rules] == ["apart"] and rules[0]["broken"], rules
    plan = as_json(capsys, c, "drs", "plan", "--level", "1")
    assert [m["why"] for m in plan["moves"]] == ["rule"] and plan["moves"][0]["vm"] in ("x1", "x2"), plan
    assert ok(capsys, c, "drs", "apply", "--level", "1")
    where = hosts_of(capsys, c)
    assert where["x1"] != where["x2"], where
    wait_for("the rule kept", lambda: not as_json(capsys, c, "rule", "list")[0]["broken"])
    ok(capsys, c, "rule", "delete", "apart")
    assert as_json(capsys, c, "rule", "list") == []


def test_maintenance_empties_a_host(capsys: CapSys, cluster: Cluster) -> None:
    c = cluster
    gamma = c.agents["gamma"]
    create_busy(gamma, "busy", run=7)
    sampled(c, ["busy"], samples=2)
    # A powered-off VM leaves too (offline), its disk's bytes along.
    ok(capsys, c, "vm", "create", "cold", "--host", "gamma", *SMALL_VM)
    pattern = os.urandom(1 << 20)
    with (gamma.datastores["main"] / "cold" / "disk0.raw").open("r+b") as f:
        f.seek(4 << 20)
        f.write(pattern)
    on_gamma = sorted(n for n, h in hosts_of(capsys, c).items() if h == "gamma")
    assert "busy" in on_gamma and "cold" in on_gamma
    r = hk(capsys, c, "host", "maintenance", "gamma", "--enter")
    assert r.code == 0, r
    assert "no VM is on it" in r.out and "[1/" in r.out
    where = hosts_of(capsys, c)
    assert all(where[n] != "gamma" for n in on_gamma), where
    assert not (gamma.datastores["main"] / "cold").exists()
    with (c.agents[str(where["cold"])].datastores["main"] / "cold" / "disk0.raw").open("rb") as f:
        f.seek(4 << 20)
        assert f.read(1 << 20) == pattern
    ok(capsys, c, "vm", "delete", "cold", "--yes")
    assert {h["name"]: h["state"] for h in as_json(capsys, c, "host", "list")}["gamma"] == "maintenance"
    # Nothing is placed on it meanwhile, and the guest kept writing: it verifies its disk where it is.
    placed = ok(capsys, c, "vm", "create", "later", *SMALL_VM)
    assert "placed on gamma" not in placed
    ok(capsys, c, "vm", "delete", "later", "--yes")
    owner = c.agents[str(where["busy"])]
    from tests.support.agent_vms import wait_console

    wait_console(owner, "busy", r"PROGRESS run=7 ", after=0)
    stop_and_verify(owner, "busy", 7, 0)  # the console there is its own
    ok(capsys, c, "host", "maintenance", "gamma", "--exit")
    assert {h["name"]: h["state"] for h in as_json(capsys, c, "host", "list")}["gamma"] == "up"
    ok(capsys, c, "vm", "delete", "busy", "--yes")


def test_scheduled_migration_runs_once_at_its_time(capsys: CapSys, cluster: Cluster) -> None:
    c = cluster
    where = hosts_of(capsys, c)
    source = where["s1"]
    target = next(h for h in ("alpha", "beta", "gamma") if h != source)
    cancelled = as_json(capsys, c, "schedule", "add", "s1", "--to", target, "--at", "+600s")
    added = as_json(capsys, c, "schedule", "add", "s1", "--to", target, "--at", "+4s")
    assert "cancelled" in ok(capsys, c, "schedule", "cancel", cancelled["id"])
    assert hk(capsys, c, "schedule", "cancel", cancelled["id"]).code == 2
    listed = {s["id"]: s for s in as_json(capsys, c, "schedule", "list")}
    assert listed[added["id"]]["state"] == "pending" and listed[cancelled["id"]]["state"] == "cancelled"
    assert hosts_of(capsys, c)["s1"] == source  # not before its time

    def state() -> str:
        return str({s["id"]: s for s in as_json(capsys, c, "schedule", "list")}[added["id"]]["state"])

    wait_for("the scheduled migration done", lambda: state() in ("done", "failed"), timeout=180)
    final = {s["id"]: s for s in as_json(capsys, c, "schedule", "list")}[added["id"]]
    assert final["state"] == "done" and final["runner"] == source, final
    assert hosts_of(capsys, c)["s1"] == target
    jobs = [m for m in as_json(capsys, c, "migrations")["migrations"] if m["id"] == final["migration"]]
    assert len(jobs) == 1 and jobs[0]["phase"] == "done"
    assert final["updated_at"] >= added["at"]  # settled after its time
    assert time.time() >= added["at"]


def test_automatic_planner_repairs_a_rule(capsys: CapSys, cluster: Cluster) -> None:
    c = cluster
    source = hosts_of(capsys, c)["s2"]
    target = next(h for h in ("alpha", "beta", "gamma") if h != source)
    shown = as_json(capsys, c, "drs", "auto", "on", "--interval", "1", "--level", "1")
    assert shown["auto"] is True and shown["interval"] == 1 and shown["level"] == 1
    wait_for("a leader", lambda: as_json(capsys, c, "drs", "auto")["leader"] in c.agents)
    ok(capsys, c, "rule", "add", "pin", "--vm-host", "s2", "--hosts", target, "--must")
    wait_for("s2 moved by the automatic planner", lambda: hosts_of(capsys, c)["s2"] == target, timeout=180)
    assert "automatic DRS is off" in ok(capsys, c, "drs", "auto", "off")
    # The run that moved it is recorded in etcd: what it saw, the move, the schedule it was handed to.
    runs = as_json(capsys, c, "drs", "history")
    moved = [(r, m) for r in runs for m in r["moves"] if m["vm"] == "s2"]
    assert moved, runs
    run, move = moved[0]
    assert run["leader"] in c.agents and run["level"] == 1
    assert (move["source"], move["target"], move["why"]) == (source, target, "rule") and move["schedule"]
    handed = [m["schedule"] for _, m in moved if m["schedule"]]
    assert len(handed) == 1, moved  # later runs saw its move under way: not handed twice

    def settled() -> bool:
        return bool(
            {s["id"]: s for s in as_json(capsys, c, "schedule", "list")}[handed[0]]["state"] == "done"
        )

    wait_for("the handed schedule done", settled)
    assert f"s2: {source} -> {target} (migrate, rule; schedule" in ok(capsys, c, "drs", "history")
    ok(capsys, c, "rule", "delete", "pin")


def test_recurring_window_runs_once_per_opening(capsys: CapSys, cluster: Cluster) -> None:
    c = cluster
    where = hosts_of(capsys, c)
    source = where["s3"]
    target = next(h for h in ("alpha", "beta", "gamma") if h != source)
    now = datetime.now(UTC)
    window = f"{(now - timedelta(minutes=1)):%H:%M}-{(now + timedelta(minutes=10)):%H:%M}"
    added = as_json(capsys, c, "schedule", "add", "s3", "--to", target, "--window", window)
    assert added["state"] == "recurring" and added["window"] == window

    def row() -> dict[str, Any]:
        return dict({s["id"]: s for s in as_json(capsys, c, "schedule", "list")}[added["id"]])

    wait_for("the window's run done", lambda: row()["outcome"] in ("done", "failed"), timeout=180)
    first = row()
    assert first["outcome"] == "done" and first["state"] == "recurring", first
    assert hosts_of(capsys, c)["s3"] == target
    time.sleep(3)  # several ticks of every agent: the open window does not run again
    assert row()["last_run"] == first["last_run"]
    assert "window" in ok(capsys, c, "schedule", "list")
    assert "cancelled" in ok(capsys, c, "schedule", "cancel", added["id"])
