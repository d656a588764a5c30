"""Server-sent events: the pages' live updates, pushed (no page reloads).

``/events``: the overview (hosts, VMs, migrations) as HTML fragments, sent when they change.
``/migrations/{id}/events``: one migration: ``samples`` (new chart rows), ``status`` (its state, bar and
fragments, see :mod:`hikkoshi.web.watch`), and ``end`` once it is over and its agent is done with it;
then the stream ends (a page that connects again gets everything again, and skips the samples it has).
A comment every few seconds keeps quiet connections alive through proxies; a stream ends when its
page goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from hikkoshi.web.context import Dashboard
from hikkoshi.web.progress import Ratchet, percent
from hikkoshi.web.render import render
from hikkoshi.web.source import SourceError
from hikkoshi.web.views import Overview
from hikkoshi.web.watch import Watch

KEEPALIVE_SECONDS = 10.0


def event(name: str, data: Any) -> str:
    """One event in the wire format (JSON data on one line)."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def stream(events: AsyncIterator[str]) -> StreamingResponse:
    """A response streaming ``events`` (never cached, never buffered by a proxy)."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def overview_fragments(dash: Dashboard, ov: Overview, ratchet: Ratchet | None = None) -> dict[str, str]:
    """The overview's live parts, rendered by the same templates as the pages (``ratchet``: what this
    page showed of each migration's progress before, so that no bar goes back)."""
    caps = dash.source.capabilities
    ratchet = ratchet or Ratchet()
    done = {m.id: ratchet(m.id, percent(m.phase, m.progress)) for m in ov.migrations}
    return {
        "hosts": render("_hosts.html", hosts=ov.hosts, caps=caps),
        "vms": render("_vms.html", vms=ov.vms),
        "migrations": render("_migrations.html", migrations=ov.migrations, done=done),
    }


async def _paced(
    request: Request,
    every: float,
    step: Callable[[], AsyncIterator[str]],
    over: Callable[[], bool] = lambda: False,
) -> AsyncIterator[str]:
    """Run ``step`` every ``every`` seconds until the page goes away or ``over()``, with keep-alive
    comments."""
    quiet_since = time.monotonic()
    while not await request.is_disconnected():
        sent = False
        async for chunk in step():
            sent = True
            yield chunk
        if over():
            return
        if sent:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(every)


def overview_events(dash: Dashboard, request: Request) -> StreamingResponse:
    """``/events``: see the module."""
    last: dict[str, str] = {}
    ratchet = Ratchet()

    async def step() -> AsyncIterator[str]:
        try:
            fragments = overview_fragments(dash, await dash.source.overview(), ratchet)
        except SourceError as exc:
            yield event("problem", {"detail": exc.detail})
            return
        changed = {k: v for k, v in fragments.items() if last.get(k) != v}
        if changed:
            last.update(changed)
            yield event("overview", changed)

    return stream(_paced(request, dash.overview_every, step))


def migration_events(dash: Dashboard, request: Request, migration_id: str) -> StreamingResponse:
    """``/migrations/{id}/events``: see the module."""
    watch = Watch(dash.source, migration_id, dash.predictions.get(migration_id))
    last: dict[str, Any] = {}
    ended = False

    async def step() -> AsyncIterator[str]:
        nonlocal ended
        try:
            offset, rows = await watch.poll()
        except SourceError as exc:
            yield event("problem", {"detail": exc.detail})
            return
        if rows:
            yield event("samples", {"offset": offset, "rows": rows})
        status = watch.status()
        # The time left changes every poll; the rest only when something happened.
        if {k: v for k, v in status.items() if k != "eta"} != {k: v for k, v in last.items() if k != "eta"}:
            yield event("status", status)
        elif status.get("eta") != last.get("eta"):
            yield event("eta", {"eta": status.get("eta")})
        last.clear()
        last.update(status)
        if watch.finished:
            ended = True
            yield event("end", {"state": status["state"]})

    return stream(_paced(request, dash.migration_every, step, lambda: ended))
