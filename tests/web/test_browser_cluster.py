"""The dashboard with ``--etcd`` in a real browser, against two real agents in a cluster and a real
guest: the hosts are those etcd lists, maintenance is entered and left from the page (etcd's key
changes), the VM shows its owner, and a migration started from the page ends done with the owner key
moved to the destination."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hikkoshi.cluster.etcd_process import EtcdMember
from hikkoshi.guest.guest_image import GuestImage
from tests.support.agent_vms import create_busy, vm_names
from tests.support.agents import agents
from tests.support.cluster_peek import ClusterPeek
from tests.support.dashboard import chromium, dashboard_proc, need_chromium, screenshots_dir
from tests.support.etcd import member_running
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools

T = TypeVar("T")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdMember]:
    with member_running(tmp_path / "etcd") as member:
        yield member


def off_loop(call: Callable[[], T]) -> T:
    """``call()`` in another thread: Playwright's sync API keeps an event loop running in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


def host_row(page: Any, name: str) -> Any:
    return (
        page.get_by_role("table", name="Hosts")
        .get_by_role("row")
        .filter(has=page.get_by_role("rowheader", name=re.compile(name)))
    )


@pytest.mark.slow
def test_dashboard_on_the_cluster(guest: GuestImage, tmp_path: Path, etcd: EtcdMember) -> None:
    need_qemu_tools()
    need_chromium()
    shots = screenshots_dir()
    peek = ClusterPeek([etcd.spec.endpoint])
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "alpha", "beta", extra=("--etcd", etcd.spec.endpoint)) as (a, b):
        create_busy(a, "mover", run)
        uuid = str(a.json("vm", "show", "mover", "--json")["uuid"])
        token = a.token_file.read_text().strip()
        assert a.ca_file is not None
        args = ["--etcd", etcd.spec.endpoint, "--token-file", str(a.token_file), "--ca-file", str(a.ca_file)]
        with dashboard_proc(tmp_path / "dashboard.log", *args) as base, chromium() as browser:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.goto(base + "/")
            page.get_by_label("Token").fill(token)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(base + "/")
            for name in ("alpha", "beta"):
                host_row(page, name).get_by_text("up", exact=True).wait_for()

            # Maintenance from the page: the cluster's key, then back.
            host_row(page, "beta").get_by_role("button", name="Enter maintenance").click()
            host_row(page, "beta").get_by_text("maintenance", exact=True).wait_for()
            assert off_loop(peek.hosts)["beta"].maintenance is not None
            page.screenshot(path=str(shots / "hosts-cluster.png"), full_page=True)
            host_row(page, "beta").get_by_role("button", name="Exit maintenance").click()
            host_row(page, "beta").get_by_text("up", exact=True).wait_for()
            assert off_loop(peek.hosts)["beta"].maintenance is None

            page.get_by_role("link", name="VMs").click()
            row = page.get_by_role("table", name="VMs").get_by_role("row").filter(has_text="mover")
            row.get_by_text("running", exact=True).wait_for()
            assert (row.text_content() or "").count("alpha") >= 2  # its host and its owner
            row.get_by_role("button", name="Migrate").click()
            page.get_by_label("Destination host").select_option("beta")
            page.get_by_label("Storage").select_option("precopy")
            page.get_by_role("button", name="Start migration").click()
            page.wait_for_url(re.compile(re.escape(base) + r"/migrations/[0-9a-f]+$"))
            deadline = time.monotonic() + 420
            while (state := (page.locator("#state").text_content() or "").strip()) not in (
                "done",
                "failed",
                "rolled back",
            ):
                assert time.monotonic() < deadline, state
                time.sleep(0.5)
            assert state == "done", page.content()[-3000:]
            context.close()
        owner = peek.owner(uuid)
        assert owner is not None and owner.host == "beta"
        assert vm_names(b) == {"mover": "running"} and vm_names(a) == {}
