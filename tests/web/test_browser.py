"""The dashboard in a real browser (Debian's chromium under Playwright) against a real two-agent setup
with a real guest: a wrong token is refused and shows nothing; the right one logs in; the hosts and VMs
are there; a migration started from the page advances, live, to done, its progress never going back;
and the page asked for nothing outside the dashboard's own address. Screenshots of the main pages go
to ``build/screenshots`` (``$HIKKOSHI_SCREENSHOTS``), on a laptop's screen and a phone's."""

from __future__ import annotations

import random
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hikkoshi.guest.guest_image import GuestImage
from tests.support.agent_vms import create_busy, vm_names
from tests.support.agents import agents
from tests.support.dashboard import chromium, dashboard_proc, need_chromium, screenshots_dir
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

LAPTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
STATES = {"queued", "running", "rolling back", "done", "failed", "rolled back"}


def _log_in(page: Any, base: str, token: str) -> None:
    page.goto(base + "/")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(base + "/")


def _refuses_when_wrong(browser: Any, base: str, shots: Path) -> None:
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    page.goto(base + "/vms")
    assert page.url == base + "/login"  # nothing without the token
    page.get_by_label("Token").fill("not-the-token")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("alert").filter(has_text="That token is not right").wait_for()
    assert page.url.startswith(base + "/login")
    page.screenshot(path=str(shots / "login-refused.png"))
    page.goto(base + "/migrations")
    assert page.url == base + "/login"
    assert context.cookies() == []
    context.close()


def _watch_to_the_end(page: Any, shots: Path, timeout: float = 420.0) -> list[float]:
    """Follow the migration page until its state is final; the progress values seen, in order."""
    seen: list[float] = []
    shot = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = page.locator("#state").text_content().strip()
        assert state in STATES, state
        seen.append(float(page.get_by_role("progressbar", name="Progress").get_attribute("aria-valuenow")))
        if not shot and page.locator("#phase").text_content() in ("memory-precopy", "storage-post"):
            page.screenshot(path=str(shots / "migration-running.png"), full_page=True)
            shot = True
        if state in ("done", "failed", "rolled back"):
            return seen
        time.sleep(0.25)
    raise AssertionError(f"the migration did not end; progress seen {seen[-10:]}")


@pytest.mark.slow
def test_dashboard_in_a_browser(guest: GuestImage, tmp_path: Path) -> None:
    need_qemu_tools()
    need_chromium()
    shots = screenshots_dir()
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "alpha", "beta") as (a, b):
        create_busy(a, "mover", run)
        token = a.token_file.read_text().strip()
        args = ["--agent", a.url, "--agent", b.url, "--token-file", str(a.token_file)]
        with dashboard_proc(tmp_path / "dashboard.log", *args) as base, chromium() as browser:
            # It listens on exactly the address given: another loopback address finds nothing.
            port = int(base.rsplit(":", 1)[1])
            with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), timeout=2):
                pass
            _refuses_when_wrong(browser, base, shots)

            context = browser.new_context(viewport=LAPTOP)
            requests: list[str] = []
            context.on("request", lambda r: requests.append(r.url))
            page = context.new_page()
            _log_in(page, base, token)
            (cookie,) = context.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != token

            hosts = page.get_by_role("table", name="Hosts")
            for name in ("alpha", "beta"):
                row = hosts.get_by_role("row").filter(
                    has=page.get_by_role("rowheader", name=re.compile(name))
                )
                row.get_by_text("up", exact=True).wait_for()
            page.screenshot(path=str(shots / "hosts.png"), full_page=True)

            page.get_by_role("link", name="VMs").click()
            vm_row = page.get_by_role("table", name="VMs").get_by_role("row").filter(has_text="mover")
            vm_row.get_by_text("running", exact=True).wait_for()
            assert "alpha" in (vm_row.text_content() or "")
            page.screenshot(path=str(shots / "vms.png"), full_page=True)

            vm_row.get_by_role("button", name="Migrate").click()
            page.get_by_label("Destination host").select_option("beta")
            page.get_by_label("Storage").select_option("hybrid")
            prediction = page.get_by_role("region", name="Prediction")
            prediction.get_by_text("Total time").wait_for()
            page.screenshot(path=str(shots / "migrate.png"), full_page=True)
            page.get_by_role("button", name="Start migration").click()
            page.wait_for_url(re.compile(re.escape(base) + r"/migrations/[0-9a-f]+$"))
            migration_url = page.url

            seen = _watch_to_the_end(page, shots)
            assert (page.locator("#state").text_content() or "").strip() == "done", page.content()[-3000:]
            assert seen == sorted(seen) and seen[-1] == 100.0  # never backwards
            assert len(set(seen)) > 2  # it advanced, live, on the open page
            page.get_by_role("heading", name="Report").wait_for()
            assert page.locator(".phases .ph-switchover").count() == 1
            assert page.locator("table.rounds tbody tr").count() >= 1
            assert page.locator("#chart-memory canvas").count() == 1
            page.wait_for_timeout(1000)  # the last samples drawn
            page.screenshot(path=str(shots / "migration.png"), full_page=True)

            page.get_by_role("link", name="Migrations").click()
            past = page.get_by_role("table", name="Past").get_by_role("row").filter(has_text="mover")
            past.locator(".state", has_text="done").wait_for()
            page.screenshot(path=str(shots / "migrations.png"), full_page=True)
            page.get_by_role("link", name="VMs").click()
            moved = page.get_by_role("table", name="VMs").get_by_role("row").filter(has_text="mover")
            moved.get_by_text("beta", exact=True).wait_for()

            phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
            phone.on("request", lambda r: requests.append(r.url))
            small = phone.new_page()
            _log_in(small, base, token)
            small.screenshot(path=str(shots / "hosts-phone.png"), full_page=True)
            small.goto(migration_url)
            small.get_by_role("heading", name="Report").wait_for()
            small.wait_for_timeout(1000)
            small.screenshot(path=str(shots / "migration-phone.png"), full_page=True)
            phone.close()
            context.close()

            outside = [u for u in requests if not u.startswith(base + "/")]
            assert outside == [] and len(requests) > 10
        assert vm_names(b) == {"mover": "running"} and vm_names(a) == {}
