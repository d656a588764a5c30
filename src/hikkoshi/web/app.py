"""The dashboard's FastAPI application: pages, actions and live events behind a login, its own static
files, and headers that keep the browser to this address (no script, style or connection elsewhere)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from hikkoshi import __version__
from hikkoshi.web import actions, pages
from hikkoshi.web.auth import COOKIE
from hikkoshi.web.context import Dashboard
from hikkoshi.web.events import migration_events, overview_events
from hikkoshi.web.render import STATIC, render
from hikkoshi.web.source import SourceError

#: What a page may load, and from where: this address only ('unsafe-inline' styles: uPlot and the
#: phase bars size elements with style attributes; no inline script runs).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _public(path: str) -> bool:
    return path == "/login" or path.startswith("/static/")


def create_app(dash: Dashboard) -> FastAPI:
    """The dashboard for ``dash``; serving it closes the source's connections at the end."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await dash.source.aclose()

    app = FastAPI(
        title="hikkoshi dashboard",
        version=__version__,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        response = await _checked(request, call_next)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        # Not no-referrer: with it a browser sends "Origin: null" on its own forms, which the check refuses.
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    async def _checked(request: Request, call_next: Any) -> Response:
        if request.method not in ("GET", "HEAD"):
            # A form posted from another origin is refused even before the session is looked at (the
            # SameSite cookie would not come along anyway).
            origin = request.headers.get("origin")
            if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
                return PlainTextResponse("cross-origin request refused", status_code=403)
        if _public(request.url.path) or dash.sessions.valid(request.cookies.get(COOKIE)):
            response: Response = await call_next(request)
            return response
        if request.method == "GET" and not request.url.path.endswith("/events"):
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse("log in first (the token, on /login)", status_code=401)

    @app.exception_handler(SourceError)
    async def source_error(_request: Request, exc: SourceError) -> HTMLResponse:
        html = render("error.html", kind=dash.source.kind, caps=dash.source.capabilities, detail=exc.detail)
        return HTMLResponse(html, status_code=exc.status if 400 <= exc.status < 600 else 502)

    app.include_router(pages.router(dash))
    app.include_router(actions.router(dash))

    @app.get("/events")
    async def events(request: Request) -> Response:
        """The overview, live."""
        return overview_events(dash, request)

    @app.get("/migrations/{migration_id}/events")
    async def one_migration_events(
        request: Request, migration_id: Annotated[str, Path(max_length=64, pattern=r"^[0-9a-f]+$")]
    ) -> Response:
        """One migration, live."""
        return migration_events(dash, request, migration_id)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
