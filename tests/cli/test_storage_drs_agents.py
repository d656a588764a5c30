"""Storage DRS with a real agent, etcd and guest: a datastore over its space threshold (80 %) gets
relieved, the disks of a running VM moving live (``storage-migrate``) to another datastore of its host.

One agent with two datastores; DRS counts 100 MiB of ``main`` (``--datastore-capacity``), where a VM
with a thick 88 MiB disk runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from hikkoshi.guest.guest_image import GuestImage
from tests.support.agents import AgentProc
from tests.support.cluster_cli import wait_for
from tests.support.etcd_agents import cluster_cli, etcd_agents
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools

CapSys = pytest.CaptureFixture[str]
DISK = ("--disk", "88M:thick")


@pytest.fixture
def solo(tmp_path_factory: pytest.TempPathFactory, guest: GuestImage) -> Iterator[tuple[str, AgentProc]]:
    need_qemu_tools()
    extra = ["--datastore-capacity", "main=100M", "--load-interval", "1", "--load-window", "3"]
    with etcd_agents(
        tmp_path_factory.mktemp("sdrs"), "solo", datastores=("main", "spare"), extra=extra
    ) as got:
        _member, url, (a,) = got
        yield url, a


def test_a_full_datastore_is_relieved(capsys: CapSys, solo: tuple[str, AgentProc]) -> None:
    url, agent = solo

    def run(*args: str) -> str:
        r = cluster_cli(capsys, url, agent, *args)
        assert r.code == 0, r
        return r.out

    def hk(*args: str) -> Any:
        return json.loads(run(*args, "--json"))

    run("vm", "create", "full", "--host", "solo", "--guest", "idle", "--no-nic", "--memory", "128", *DISK)
    run("vm", "start", "full")
    wait_for("full runs", lambda: [v["state"] for v in hk("vm", "list")] == ["running"])

    def plan() -> Any:
        return hk("drs", "plan")

    wait_for("a storage move", lambda: any(m["why"] == "space" for m in plan()["moves"]), timeout=60)
    (move,) = plan()["moves"]
    assert (move["vm"], move["kind"], move["from"], move["to"]) == ("full", "storage", "solo", "solo")
    assert "main" not in (move["datastore"] or "") and move["reason"], move
    applied = hk("drs", "apply")
    assert [m["phase"] for m in applied["moves"]] == ["done"], applied
    assert (agent.datastores["spare"] / "full").is_dir() and not (agent.datastores["main"] / "full").exists()
    wait_for("nothing left to move", lambda: plan()["moves"] == [], timeout=30)
    assert hk("vm", "show", "full")["state"] == "running"
