"""The dashboard's pages (GET, server-rendered): hosts, VMs, migrations, one migration with its live
timeline, the migration form with its prediction, DRS recommendations, and the login page."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse

from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.web.context import Dashboard
from hikkoshi.web.events import overview_fragments
from hikkoshi.web.prediction import prediction_for
from hikkoshi.web.render import render
from hikkoshi.web.source import NotAvailable, SourceError
from hikkoshi.web.views import Overview, VmView
from hikkoshi.web.watch import Watch

Name = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
MigrationId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
Notice = Annotated[str | None, Query(max_length=500)]
STORAGE_MODES = [m.value for m in StorageMode]


def page(dash: Dashboard, name: str, code: int = 200, **context: Any) -> HTMLResponse:
    """A page of the dashboard (``name``: its template)."""
    html = render(name, kind=dash.source.kind, caps=dash.source.capabilities, **context)
    return HTMLResponse(html, status_code=code)


def find_vm(ov: Overview, host: str, vm: str) -> VmView:
    for v in ov.vms:
        if v.host == host and v.name == vm:
            return v
    raise SourceError(404, f"no VM {vm!r} on host {host!r}")


def _prediction(dash: Dashboard, vm: VmView, storage: str) -> dict[str, Any]:
    return prediction_for(vm, storage, dash.link)


def router(dash: Dashboard) -> APIRouter:
    """The pages' routes."""
    r = APIRouter()

    @r.get("/login", response_class=HTMLResponse)
    async def login_page(wrong: bool = False) -> HTMLResponse:
        return page(dash, "login.html", code=401 if wrong else 200, wrong=wrong)

    @r.get("/", response_class=HTMLResponse)
    async def hosts(notice: Notice = None, error: Notice = None) -> HTMLResponse:
        ov = await dash.source.overview()
        return page(
            dash, "hosts.html", active="hosts", live=overview_fragments(dash, ov), notice=notice, error=error
        )

    @r.get("/vms", response_class=HTMLResponse)
    async def vms(notice: Notice = None, error: Notice = None) -> HTMLResponse:
        ov = await dash.source.overview()
        return page(
            dash, "vms.html", active="vms", live=overview_fragments(dash, ov), notice=notice, error=error
        )

    @r.get("/migrations", response_class=HTMLResponse)
    async def migrations(notice: Notice = None, error: Notice = None) -> HTMLResponse:
        ov = await dash.source.overview()
        return page(
            dash, "migrations.html", active="migrations", live=overview_fragments(dash, ov), notice=notice,
            error=error,
        )  # fmt: skip

    @r.get("/migrations/{migration_id}", response_class=HTMLResponse)
    async def migration(
        migration_id: MigrationId, notice: Notice = None, error: Notice = None
    ) -> HTMLResponse:
        watch = Watch(dash.source, migration_id, dash.predictions.get(migration_id))
        await watch.poll()
        status = watch.status()
        return page(
            dash, "migration.html", active="migrations", m=watch.migration, status=status, notice=notice,
            error=error,
        )  # fmt: skip

    @r.get("/vms/{host}/{vm}/migrate", response_class=HTMLResponse)
    async def migrate_form(
        host: Name,
        vm: Name,
        to: Annotated[str | None, Query(max_length=64)] = None,
        storage: Annotated[str, Query(max_length=16)] = "hybrid",
        error: Notice = None,
    ) -> HTMLResponse:
        ov = await dash.source.overview()
        the_vm = find_vm(ov, host, vm)
        destinations = [h for h in ov.hosts if h.name != host and h.state == "up"]
        if storage not in STORAGE_MODES:
            storage = "hybrid"
        chosen = (
            to
            if any(h.name == to for h in destinations)
            else (destinations[0].name if destinations else None)
        )
        return page(
            dash,
            "migrate.html",
            active="vms",
            vm=the_vm,
            destinations=destinations,
            chosen=chosen,
            storage=storage,
            modes=STORAGE_MODES,
            forecast=_prediction(dash, the_vm, storage),
            error=error,
        )

    @r.get("/vms/{host}/{vm}/prediction", response_class=HTMLResponse)
    async def prediction(
        host: Name, vm: Name, storage: Annotated[str, Query(max_length=16)] = "hybrid"
    ) -> HTMLResponse:
        if storage not in STORAGE_MODES:
            raise SourceError(422, f"storage must be one of {', '.join(STORAGE_MODES)}")
        the_vm = find_vm(await dash.source.overview(), host, vm)
        return HTMLResponse(render("_prediction.html", forecast=_prediction(dash, the_vm, storage)))

    @r.get("/recommendations", response_class=HTMLResponse)
    async def recommendations(notice: Notice = None, error: Notice = None) -> HTMLResponse:
        try:
            recs, unavailable = await dash.source.recommendations(), None
        except NotAvailable as exc:
            recs, unavailable = [], exc.detail
        return page(
            dash, "recommendations.html", active="drs", recs=recs, unavailable=unavailable, notice=notice,
            error=error,
        )  # fmt: skip

    return r
