"""The dashboard's application over HTTP with a canned source (no agents): nothing is shown or changed
without logging in with the token, the session cookie's attributes, the pages and their controls'
names, the actions going to the source, refusals of other origins, and a migration's event stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from hikkoshi.web.app import create_app
from hikkoshi.web.auth import COOKIE, Sessions
from hikkoshi.web.context import Dashboard
from tests.support.fake_source import FakeSource

TOKEN = "the-token"
BASE = "http://dash.test"


def _client(source: FakeSource) -> httpx.AsyncClient:
    dash = Dashboard(source=source, sessions=Sessions(TOKEN), migration_every=0.01)
    transport = httpx.ASGITransport(app=create_app(dash))
    return httpx.AsyncClient(transport=transport, base_url=BASE)


async def _logged_in(client: httpx.AsyncClient) -> None:
    r = await client.post("/login", data={"token": TOKEN})
    assert r.status_code == 303 and r.headers["location"] == "/"


def _events(body: str) -> list[tuple[str, Any]]:
    out = []
    for block in body.split("\n\n"):
        lines = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":")
        )
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_nothing_without_the_token() -> None:
    async def go() -> None:
        source = FakeSource()
        async with _client(source) as c:
            for path in ("/", "/vms", "/migrations", "/migrations/abc123", "/vms/alpha/web/migrate"):
                r = await c.get(path)
                assert r.status_code == 303 and r.headers["location"] == "/login", path
            for path in ("/events", "/migrations/abc123/events"):
                assert (await c.get(path)).status_code == 401
            for path in ("/vms/alpha/web/migrate", "/migrations/abc123/cancel", "/hosts/alpha/maintenance"):
                assert (await c.post(path, data={"to": "beta", "action": "enter"})).status_code == 401
            assert source.actions == []
            login = await c.get("/login")
            assert login.status_code == 200 and '<label for="token">Token</label>' in login.text
            wrong = await c.post("/login", data={"token": "nope"})
            assert wrong.status_code == 303 and wrong.headers["location"] == "/login?wrong=1"
            assert COOKIE not in wrong.headers.get("set-cookie", "")
            refused = await c.get("/login?wrong=1")
            assert refused.status_code == 401 and "That token is not right" in refused.text
            # A cookie the dashboard never gave is nobody's session.
            c.cookies.set(COOKIE, "forged")
            assert (await c.get("/")).status_code == 303

    run(go())


def test_login_cookie_and_logout() -> None:
    async def go() -> None:
        async with _client(FakeSource()) as c:
            r = await c.post("/login", data={"token": TOKEN})
            cookie = r.headers["set-cookie"]
            assert cookie.startswith(f"{COOKIE}=") and TOKEN not in cookie
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
            page = await c.get("/")
            assert page.status_code == 200 and "alpha" in page.text and "beta" in page.text
            assert "default-src 'self'" in page.headers["content-security-policy"]
            await c.post("/logout")
            assert (await c.get("/")).status_code == 303

    run(go())


def test_pages_and_their_controls() -> None:
    async def go() -> None:
        source = FakeSource()
        async with _client(source) as c:
            await _logged_in(c)
            hosts = (await c.get("/")).text
            assert "Enter maintenance" in hosts and "0.5 0.4 0.3" in hosts
            vms = (await c.get("/vms")).text
            assert '<button type="submit">Migrate</button>' in vms and "64.0 MiB thin" in vms
            form = (await c.get("/vms/alpha/web/migrate")).text
            for label in ('<label for="to">Destination host</label>', '<label for="storage">Storage</label>',
                          '<button type="submit">Start migration</button>', "Total time"):  # fmt: skip
                assert label in form
            assert '<option value="beta" selected>' in form and '<option value="alpha"' not in form
            fragment = await c.get("/vms/alpha/web/prediction?storage=shared")
            assert fragment.status_code == 200 and "0 B disk" in fragment.text
            page = (await c.get("/migrations/abc123")).text
            assert 'id="state"' in page and ">done<" in page and "Predicted vs actual" in page
            assert "80.0 ms" in page and "Report" in page and "Cancel migration" not in page
            assert (await c.get("/migrations/ffff")).status_code == 404
            assert (await c.get("/vms/alpha/nosuch/migrate")).status_code == 404
            assert "Not available: no DRS here" in (await c.get("/recommendations")).text
            assert (await c.get("/static/vendor/uPlot.iife.min.js")).status_code == 200

    run(go())


def test_actions_go_to_the_source() -> None:
    async def go() -> None:
        source = FakeSource()
        async with _client(source) as c:
            await _logged_in(c)
            r = await c.post("/vms/alpha/web/migrate", data={"to": "beta", "storage": "precopy"})
            assert r.status_code == 303 and r.headers["location"] == "/migrations/def456"
            assert source.actions[-1] == ("migrate", "web", "alpha", "beta", "precopy")
            # The prediction shown before is kept, and shown beside the migration.
            running = (await c.get("/migrations/def456")).text
            assert (
                "Predicted vs actual" in running and "Cancel migration" in running and ">running<" in running
            )
            refused = await c.post("/vms/alpha/web/migrate", data={"to": "nowhere", "storage": "hybrid"})
            assert "does+not+answer" in refused.headers["location"]
            bad = await c.post("/vms/alpha/web/migrate", data={"to": "beta", "storage": "teleport"})
            assert "unknown+storage+mode" in bad.headers["location"]
            await c.post("/migrations/def456/cancel")
            await c.post("/hosts/beta/maintenance", data={"action": "enter"})
            await c.post("/hosts/beta/maintenance", data={"action": "exit"})
            assert source.actions[-3:] == [("cancel", "def456"), ("maintenance", "beta", True),
                                           ("maintenance", "beta", False)]  # fmt: skip
            # Another origin's form is refused before anything happens.
            other = await c.post("/migrations/def456/cancel", headers={"Origin": "http://evil.test"})
            assert other.status_code == 403 and len(source.actions) == 5
            too_long = await c.post("/hosts/beta/maintenance", data={"reason": "x" * 20000})
            assert too_long.status_code == 413

    run(go())


def test_migration_events_stream_to_the_end() -> None:
    async def go() -> None:
        async with _client(FakeSource()) as c:
            await _logged_in(c)
            r = await c.get("/migrations/abc123/events")
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _events(r.text)
            names = [name for name, _data in events]
            assert names[0] == "samples" and "status" in names and names[-1] == "end"
            rows = events[0][1]
            assert rows["offset"] == 0 and len(rows["rows"]) == 5
            status = dict(events)["status"]
            assert status["state"] == "done" and status["percent"] == 100.0 and status["final"]
            assert status["timeline"]["downtime"]["ms"] == 80.0
            assert "switchover" in status["html"]["phases"] and "Report" in status["html"]["report"]

    run(go())
