"""`hikkoshi lab`: hosts in network namespaces, each with its own address and agent, two sites joined by
the WAN emulator; a guest migrates across, driven by the CLI from the root namespace."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.lab.netns_lab import plan_lab, setup_commands, teardown_commands
from tests.support.agent_vms import create_busy, stop_and_verify, vm_names, wait_console
from tests.support.agents import AgentProc
from tests.support.cli import hikkoshi as hk
from tests.support.vms import alive, need_qemu_tools
from tests.support.vms import guest as guest


def test_plan_names_and_addresses() -> None:
    plan = plan_lab(["east1", "west1", "west2"], ["east", "west", "west"], 7)
    assert [h.address for h in plan.hosts] == ["10.203.7.1", "10.203.7.2", "10.203.7.3"]
    assert plan.gateway == "10.203.7.254" and plan.bridge == "hkl7br"
    names = [plan.bridge] + [n for h in plan.hosts for n in (h.veth_root, h.veth_ns)]
    assert all(len(n) <= 15 for n in names) and len(set(names)) == len(names)
    assert len({h.netns for h in plan.hosts}) == 3
    made = setup_commands(plan)
    assert made[0] == ["ip", "link", "add", "hkl7br", "type", "bridge"]
    assert ["ip", "-n", "hkl7-west2", "addr", "add", "10.203.7.3/24", "dev", "hkl7n2"] in made
    assert teardown_commands(plan)[-1] == ["ip", "link", "del", "hkl7br"]
    bad: list[tuple[list[str], list[str]]] = [([], []), (["a", "a"], ["s", "s"]), (["a"], ["s", "t"])]
    for names, sites in [*bad, (["a b"], ["s"])]:
        with pytest.raises(ValueError):
            plan_lab(names, sites, 0)
    with pytest.raises(ValueError):
        plan_lab(["a"], ["s"], 256)


@pytest.mark.slow
def test_lab_migrates_a_guest_across_sites(guest: GuestImage, tmp_path: Path) -> None:
    need_qemu_tools()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    lab_dir = tmp_path / "lab"
    number = random.randrange(100, 250)  # out of the way of a user's lab 0
    up = hk("lab", "up", str(lab_dir), "--hosts", "east,west", "--wan", "30ms,200Mbit", "--lab", str(number))
    assert up.returncode == 0, up.stderr
    lab = json.loads((lab_dir / "lab.json").read_text())
    pids = [int(h["pid"]) for h in lab["hosts"]] + [int(lab["etcd"]["pid"])]
    assert lab["etcd"]["url"] == f"http://10.203.{number}.254:2379"
    try:
        east, west = (
            AgentProc(
                h["name"],
                lab_dir / h["name"],
                lab_dir / "token",
                {"main": Path(h["datastore"])},
                url=h["url"],
                ca_file=lab_dir / "pki" / "ca" / "ca-cert.pem",
            )
            for h in lab["hosts"]
        )
        east.url, west.url = (h["url"] for h in lab["hosts"])
        assert east.url == f"https://10.203.{number}.1:8710" and west.url == f"https://10.203.{number}.2:8710"
        status = json.loads(hk("lab", "status", str(lab_dir), "--json").stdout)
        assert [h["agent_running"] for h in status["hosts"]] == [True, True]
        assert [h["site"] for h in status["hosts"]] == ["site-a", "site-b"]
        # Each agent lives in its own namespace: its address is not one of the root namespace's.
        root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert f"10.203.{number}.1/" not in root and f"10.203.{number}.254/" in root
        run = random.randrange(1, 2**31)
        create_busy(east, "far", run)
        # The agents joined the lab's etcd: the CLI finds hosts and VMs through it, by name.
        ca = str(lab_dir / "pki" / "ca" / "ca-cert.pem")
        etcd = ("--etcd", lab["etcd"]["url"], "--token-file", str(lab_dir / "token"), "--ca-file", ca)
        hosts = json.loads(hk(*etcd, "host", "list", "--json").stdout)
        assert sorted((h["name"], h["state"]) for h in hosts) == [("east", "up"), ("west", "up")]
        moved = hk(*etcd, "migrate", "far", "--to", "west", "--json", timeout=600)
        assert moved.returncode == 0, moved.stderr
        record = json.loads(moved.stdout)
        assert record["phase"] == "done", record
        # Known by its certificate (the URL named an address), and every stream encrypted.
        assert record["record"]["destination"]["host"] == "west" and record["report"]["encrypted"] is True
        routes = record["record"]["facts"]["routes"]
        assert {k.split()[0] for k in routes} == {"stream", "export"}  # through the WAN relays
        assert all(v.startswith(f"10.203.{number}.1:") for v in routes.values())
        assert vm_names(west) == {"far": "running"} and vm_names(east) == {}
        mark = len(west.cli("vm", "console", "far").stdout)
        wait_console(west, "far", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(west, "far", run, mark)
    finally:
        down = hk("lab", "down", str(lab_dir))
    assert down.returncode == 0, down.stderr
    assert not any(alive(p) for p in pids)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"hkl{number}-" not in netns
    assert subprocess.run(["ip", "link", "show", f"hkl{number}br"], capture_output=True).returncode != 0
    assert not lab_dir.exists()
