"""The agent's HTTP API (FastAPI), always over TLS with the host's certificate.

Two kinds of callers, told apart before anything else runs:

- people and scripts: the user routes (VMs, migrations, the host), with the agent's token
  (``Authorization: Bearer``);
- other agents of the cluster: the peer routes (``/v1/incoming``, ``/v1/held``, ``/v1/peer``; see
  :mod:`hikkoshi.agent.api_peers`), with a client certificate of the cluster CA and never the token.
  Each call is bound to the host the certificate names.

Errors are JSON ``{"detail": ...}`` with a 4xx status that says what kind. The schema is at
``/v1/openapi.json`` (with the token)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hikkoshi import __version__
from hikkoshi.agent.api_peers import PEER_PREFIXES, peer_router
from hikkoshi.agent.errors import Problem, status_of
from hikkoshi.agent.migration_routes import add_migration_routes
from hikkoshi.agent.models import (
    Accepted,
    HostInfo,
    MigrateBody,
    MigrationInfo,
    StorageMigrateBody,
    VmCreate,
    VmInfo,
    VmStop,
)
from hikkoshi.agent.service import Agent
from hikkoshi.agent.tls_server import peer_of_request
from hikkoshi.guest.guest_image import GuestImageError, build_guest
from hikkoshi.vm.errors import VmError

VmName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
MigrationId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the agent cannot do that (the detail says why)"},
    401: {"description": "no or wrong token"},
    403: {"description": "a route for the cluster's agents: a host certificate of the cluster is needed"},
    404: {"description": "no such VM, datastore or migration"},
    409: {"description": "not in a state that allows it"},
    422: {"description": "invalid request"},
    424: {"description": "what the request depends on failed: QEMU did not start, a peer agent refused"},
}


_bearer = HTTPBearer(auto_error=False, description="the agent's token")


def _documented_token(_credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Puts the token into the schema; the check itself comes first, in ``callers_first``."""


def create_app(agent: Agent) -> FastAPI:
    """The API of ``agent``; serving it runs the agent (its lifespan)."""
    expected = agent.config.token.encode()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with agent.running():
            yield

    app = FastAPI(
        title="hikkoshi agent",
        version=__version__,
        description="One host's VMs, datastores and migrations.",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        responses=_ERRORS,
    )
    user = APIRouter(dependencies=[Depends(_documented_token)])

    @app.middleware("http")
    async def callers_first(request: Request, call_next: Any) -> Any:
        # Before routing and validation: a caller that is not who the route is for learns nothing, not
        # even a 422.
        if request.url.path.startswith(PEER_PREFIXES):
            if peer_of_request(request) is None:
                return JSONResponse(
                    {
                        "detail": "this route is for the agents of the cluster: connect with a host "
                        "certificate of the cluster CA (the token does not open it)"
                    },
                    status_code=403,
                )
            return await call_next(request)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            return JSONResponse(
                {"detail": "a valid token is required (Authorization: Bearer TOKEN)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

    async def _problem(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc) or type(exc).__name__}, status_code=status_of(exc))

    for kind in (Problem, VmError, ValueError, GuestImageError, OSError):
        app.add_exception_handler(kind, _problem)

    # --- the host -----------------------------------------------------------------------------------------

    @user.get("/v1/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @user.get("/v1/host", response_model=HostInfo, tags=["host"])
    async def host() -> HostInfo:
        """The host, its datastores and accelerator."""
        return await agent.host.info()

    @user.post("/v1/guest/build", tags=["host"])
    async def guest_build() -> dict[str, str]:
        """Build the test guest (a Debian kernel and a busybox initramfs) if it is not built yet."""
        guest = await asyncio.to_thread(build_guest)
        return {"kernel": str(guest.kernel), "initrd": str(guest.initrd)}

    # --- VMs ----------------------------------------------------------------------------------------------

    @user.get("/v1/vms", response_model=list[VmInfo], tags=["vms"])
    async def vms() -> list[VmInfo]:
        """Every VM of the host's datastores."""
        return await agent.host.vms()

    @user.post("/v1/vms", response_model=VmInfo, status_code=201, tags=["vms"])
    async def create_vm(body: VmCreate) -> VmInfo:
        """Create a VM: its home, disks and spec."""
        return await agent.host.create(body)

    @user.get("/v1/vms/{name}", response_model=VmInfo, tags=["vms"])
    async def vm(name: VmName) -> VmInfo:
        """One VM."""
        return await agent.host.vm(name)

    @user.post("/v1/vms/{name}/start", response_model=VmInfo, tags=["vms"])
    async def start_vm(name: VmName) -> VmInfo:
        """Start the VM; returns once it runs."""
        agent.jobs.refuse_if_migrating(name, "started")
        return await agent.host.start(name)

    @user.post("/v1/vms/{name}/stop", response_model=VmInfo, tags=["vms"])
    async def stop_vm(name: VmName, body: VmStop | None = None) -> VmInfo:
        """Power the VM off; returns once it is off."""
        agent.jobs.refuse_if_migrating(name, "stopped")
        return await agent.host.stop(name, body or VmStop())

    @user.get(
        "/v1/vms/{name}/console",
        tags=["vms"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    async def console(name: VmName, offset: Annotated[int, Query(ge=0, le=1 << 50)] = 0) -> Response:
        """The serial console's log from ``offset`` (headers: its size, whether the VM runs)."""
        data, size, running = agent.host.console(name, offset)
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"X-Console-Size": str(size), "X-Vm-Running": "1" if running else "0"},
        )

    @user.delete("/v1/vms/{name}", status_code=204, tags=["vms"])
    async def destroy_vm(name: VmName) -> Response:
        """Delete a stopped VM with its disks."""
        agent.jobs.refuse_if_migrating(name, "destroyed")
        await agent.host.destroy(name)
        return Response(status_code=204)

    @user.post("/v1/vms/{name}/migrate", response_model=Accepted, status_code=202, tags=["migrations"])
    async def migrate(name: VmName, body: MigrateBody) -> Accepted:
        """Start a live migration to another agent's host; follow it at ``/v1/migrations/{id}``."""
        return Accepted(id=await agent.jobs.migrate(name, body))

    @user.post(
        "/v1/vms/{name}/storage-migrate", response_model=Accepted, status_code=202, tags=["migrations"]
    )
    async def storage_migrate(name: VmName, body: StorageMigrateBody) -> Accepted:
        """Start moving the VM's home and disks to another datastore of this host, live."""
        return Accepted(id=await agent.jobs.storage_migrate(name, body))

    # --- migrations ---------------------------------------------------------------------------------------

    @user.get("/v1/migrations", response_model=list[MigrationInfo], tags=["migrations"])
    async def migrations(
        vm: Annotated[str | None, Query(max_length=64)] = None,
    ) -> list[MigrationInfo]:
        """The migrations this agent ran, oldest first."""
        return agent.jobs.all(vm)

    @user.get("/v1/migrations/{migration_id}", response_model=MigrationInfo, tags=["migrations"])
    async def migration(migration_id: MigrationId) -> MigrationInfo:
        """One migration: phase, live progress, and its report when it ended."""
        return agent.jobs.info(migration_id)

    @user.get(
        "/v1/migrations/{migration_id}/timeline.png",
        tags=["migrations"],
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def timeline(migration_id: MigrationId) -> FileResponse:
        """A plot of the migration's timeline."""
        return FileResponse(agent.jobs.timeline(migration_id), media_type="image/png")

    app.include_router(user)
    add_migration_routes(app, agent)  # its timeline as data, and a person's cancel (the token, too)
    app.include_router(peer_router(agent))
    return app
