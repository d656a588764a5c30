"""What a person does on the dashboard (POST forms): log in and out, start a migration (the prediction
shown first is kept to compare with what happens), cancel one, put a host in maintenance or take it
out, apply a DRS recommendation. Each action is one call through the agents' API; the answer is a
redirect to the page that shows its effect, with the agent's words when it refused."""

from __future__ import annotations

import asyncio
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Request
from fastapi.responses import RedirectResponse, Response

from hikkoshi.web.auth import COOKIE, WRONG_TOKEN_DELAY
from hikkoshi.web.context import Dashboard
from hikkoshi.web.forms import read_form
from hikkoshi.web.pages import STORAGE_MODES, MigrationId, Name, find_vm
from hikkoshi.web.prediction import prediction_for
from hikkoshi.web.source import SourceError


def _back(path: str, **query: str) -> RedirectResponse:
    return RedirectResponse(path + ("?" + urlencode(query) if query else ""), status_code=303)


def router(dash: Dashboard) -> APIRouter:
    """The actions' routes."""
    r = APIRouter()

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await read_form(request)
        sid = dash.sessions.login(form.get("token", ""))
        if sid is None:
            await asyncio.sleep(WRONG_TOKEN_DELAY)
            return _back("/login", wrong="1")
        response = _back("/")
        response.set_cookie(
            COOKIE, sid, httponly=True, samesite="strict", path="/", secure=request.url.scheme == "https"
        )
        return response

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        dash.sessions.logout(request.cookies.get(COOKIE))
        response = _back("/login")
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @r.post("/vms/{host}/{vm}/migrate")
    async def migrate(host: Name, vm: Name, request: Request) -> Response:
        form = await read_form(request)
        to, storage = form.get("to", ""), form.get("storage", "hybrid")
        form_page = f"/vms/{host}/{vm}/migrate"
        if storage not in STORAGE_MODES:
            return _back(form_page, error=f"unknown storage mode {storage!r}")
        if not to:
            return _back(form_page, error="choose a destination host")
        try:
            the_vm = find_vm(await dash.source.overview(), host, vm)
            forecast = prediction_for(the_vm, storage, dash.link)
            migration_id = await dash.source.migrate(vm, host, to, storage)
        except SourceError as exc:
            return _back(form_page, to=to, storage=storage, error=exc.detail)
        if "prediction" in forecast:
            dash.remember_prediction(migration_id, forecast["prediction"])
        return _back(f"/migrations/{migration_id}")

    @r.post("/migrations/{migration_id}/cancel")
    async def cancel(migration_id: MigrationId) -> Response:
        try:
            await dash.source.cancel(migration_id)
        except SourceError as exc:
            return _back(f"/migrations/{migration_id}", error=exc.detail)
        return _back(f"/migrations/{migration_id}", notice="cancelled: it rolls back")

    @r.post("/hosts/{host}/maintenance")
    async def maintenance(host: Name, request: Request) -> Response:
        form = await read_form(request)
        on = form.get("action") == "enter"
        try:
            await dash.source.set_maintenance(host, on, form.get("reason", "")[:200])
        except SourceError as exc:
            return _back("/", error=exc.detail)
        return _back("/", notice=f"{host} {'is in maintenance' if on else 'left maintenance'}")

    @r.post("/recommendations/{recommendation_id}/apply")
    async def apply(
        recommendation_id: Annotated[str, Path(max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")],
    ) -> Response:
        try:
            migration_id = await dash.source.apply(recommendation_id)
        except SourceError as exc:
            return _back("/recommendations", error=exc.detail)
        return _back(f"/migrations/{migration_id}")

    return r
