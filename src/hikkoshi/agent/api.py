"""The agent's HTTP API (FastAPI): VMs, migrations, the host, and the incoming side of migrations for
other agents. Every request carries the agent's token (``Authorization: Bearer``), the schema too
(``/v1/openapi.json``). Errors are JSON ``{"detail": ...}`` with a 4xx status that says what kind."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hikkoshi import __version__
from hikkoshi.agent.errors import Problem, status_of
from hikkoshi.agent.migration_routes import add_migration_routes
from hikkoshi.agent.models import (
    Accepted,
    HostInfo,
    IncomingDisks,
    IncomingFacts,
    IncomingPull,
    IncomingStart,
    MigrateBody,
    MigrationInfo,
    PatienceBody,
    ReleaseBody,
    ResumeBody,
    StorageMigrateBody,
    StreamPrepare,
    VmCreate,
    VmInfo,
    VmStop,
)
from hikkoshi.agent.service import Agent
from hikkoshi.guest.guest_image import GuestImageError, build_guest
from hikkoshi.migrate.home_archive import MAX_ARCHIVE_BYTES
from hikkoshi.vm.disk_serving import DiskPlan
from hikkoshi.vm.errors import VmError

VmName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
MigrationId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
DatastoreName = Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the agent cannot do that (the detail says why)"},
    401: {"description": "no or wrong token"},
    404: {"description": "no such VM, datastore or migration"},
    409: {"description": "not in a state that allows it"},
    422: {"description": "invalid request"},
    424: {"description": "what the request depends on failed: QEMU did not start, a peer agent refused"},
}


_bearer = HTTPBearer(auto_error=False, description="the agent's token")


def _documented_token(_credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Puts the token into the schema; the check itself comes first, in ``token_first``."""


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
        dependencies=[Depends(_documented_token)],
        responses=_ERRORS,
    )

    @app.middleware("http")
    async def token_first(request: Request, call_next: Any) -> Any:
        # Before routing and validation: a request without the token learns nothing, not even a 422.
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

    for kind in (Problem, VmError, ValueError, GuestImageError):
        app.add_exception_handler(kind, _problem)

    # --- the host -----------------------------------------------------------------------------------------

    @app.get("/v1/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/v1/host", response_model=HostInfo, tags=["host"])
    async def host() -> HostInfo:
        """The host, its datastores and accelerator."""
        return await agent.host.info()

    @app.post("/v1/guest/build", tags=["host"])
    async def guest_build() -> dict[str, str]:
        """Build the test guest (a Debian kernel and a busybox initramfs) if it is not built yet."""
        guest = await asyncio.to_thread(build_guest)
        return {"kernel": str(guest.kernel), "initrd": str(guest.initrd)}

    # --- VMs ----------------------------------------------------------------------------------------------

    @app.get("/v1/vms", response_model=list[VmInfo], tags=["vms"])
    async def vms() -> list[VmInfo]:
        """Every VM of the host's datastores."""
        return await agent.host.vms()

    @app.post("/v1/vms", response_model=VmInfo, status_code=201, tags=["vms"])
    async def create_vm(body: VmCreate) -> VmInfo:
        """Create a VM: its home, disks and spec."""
        return await agent.host.create(body)

    @app.get("/v1/vms/{name}", response_model=VmInfo, tags=["vms"])
    async def vm(name: VmName) -> VmInfo:
        """One VM."""
        return await agent.host.vm(name)

    @app.post("/v1/vms/{name}/start", response_model=VmInfo, tags=["vms"])
    async def start_vm(name: VmName) -> VmInfo:
        """Start the VM; returns once it runs."""
        return await agent.host.start(name)

    @app.post("/v1/vms/{name}/stop", response_model=VmInfo, tags=["vms"])
    async def stop_vm(name: VmName, body: VmStop | None = None) -> VmInfo:
        """Power the VM off; returns once it is off."""
        return await agent.host.stop(name, body or VmStop())

    @app.get(
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

    @app.delete("/v1/vms/{name}", status_code=204, tags=["vms"])
    async def destroy_vm(name: VmName) -> Response:
        """Delete a stopped VM with its disks."""
        await agent.host.destroy(name)
        return Response(status_code=204)

    @app.post("/v1/vms/{name}/migrate", response_model=Accepted, status_code=202, tags=["migrations"])
    async def migrate(name: VmName, body: MigrateBody) -> Accepted:
        """Start a live migration to another agent's host; follow it at ``/v1/migrations/{id}``."""
        return Accepted(id=await agent.jobs.migrate(name, body))

    @app.post("/v1/vms/{name}/storage-migrate", response_model=Accepted, status_code=202, tags=["migrations"])
    async def storage_migrate(name: VmName, body: StorageMigrateBody) -> Accepted:
        """Start moving the VM's home and disks to another datastore of this host, live."""
        return Accepted(id=await agent.jobs.storage_migrate(name, body))

    # --- migrations ---------------------------------------------------------------------------------------

    @app.get("/v1/migrations", response_model=list[MigrationInfo], tags=["migrations"])
    async def migrations(
        vm: Annotated[str | None, Query(max_length=64)] = None,
    ) -> list[MigrationInfo]:
        """The migrations this agent ran, oldest first."""
        return agent.jobs.all(vm)

    @app.get("/v1/migrations/{migration_id}", response_model=MigrationInfo, tags=["migrations"])
    async def migration(migration_id: MigrationId) -> MigrationInfo:
        """One migration: phase, live progress, and its report when it ended."""
        return agent.jobs.info(migration_id)

    @app.get(
        "/v1/migrations/{migration_id}/timeline.png",
        tags=["migrations"],
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def timeline(migration_id: MigrationId) -> FileResponse:
        """A plot of the migration's timeline."""
        return FileResponse(agent.jobs.timeline(migration_id), media_type="image/png")

    add_migration_routes(app, agent)  # its timeline as data, and a person's cancel

    # --- incoming migrations (for other agents) -----------------------------------------------------------

    inc = agent.incoming

    @app.get("/v1/incoming/{name}", response_model=IncomingFacts, tags=["incoming"])
    async def incoming_facts(name: VmName, datastore: DatastoreName = None) -> IncomingFacts:
        """What a migration's precheck needs to know about this host."""
        return await inc.facts(name, datastore)

    @app.put(
        "/v1/incoming/{name}/home",
        tags=["incoming"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "a tar archive of the home's files",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def incoming_home(
        name: VmName,
        request: Request,
        datastore: DatastoreName = None,
        source: Annotated[str | None, Query(max_length=300, pattern=r"^https?://[^\s/]+(/.*)?$")] = None,
    ) -> dict[str, int]:
        """Make the VM's home from a tar archive of its files (disks aside)."""
        limit = MAX_ARCHIVE_BYTES + (1 << 20)
        if int(request.headers.get("content-length") or 0) > limit:
            raise Problem(f"the archive is larger than {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise Problem(f"the archive is larger than {limit} bytes")
        return {"bytes": await inc.create_home(name, datastore, bytes(data), source, None)}

    @app.post("/v1/incoming/{name}/disks", status_code=204, tags=["incoming"])
    async def incoming_disks(name: VmName, body: IncomingDisks) -> Response:
        """Empty disks for a mirror to fill."""
        await inc.create_disks(name, body.sizes)
        return Response(status_code=204)

    @app.post("/v1/incoming/{name}/pull", tags=["incoming"])
    async def incoming_pull(name: VmName, body: IncomingPull) -> dict[str, dict[str, Any]]:
        """Cold migration: copy the disks from the source's read-only export; answers when they are
        complete and flushed."""
        return await inc.pull(name, {n: (d.uri, d.size) for n, d in body.disks.items()})

    @app.put("/v1/incoming/{name}/plan", status_code=204, tags=["incoming"])
    async def incoming_plan(name: VmName, body: DiskPlan) -> Response:
        """How each disk will be served."""
        await inc.save_plan(name, body)
        return Response(status_code=204)

    @app.post("/v1/incoming/{name}/start", tags=["incoming"])
    async def incoming_start(name: VmName, body: IncomingStart) -> dict[str, Any]:
        """Start the incoming supervisor (or let this host's serving one take the VM back)."""
        return await inc.start(name, body.accel, body.migration, body.source)

    @app.post("/v1/incoming/{name}/stream", status_code=204, tags=["incoming"])
    async def incoming_stream(name: VmName, body: StreamPrepare) -> Response:
        """Prepare QEMU's side of the memory stream (with this host's TLS credentials if asked)."""
        await inc.prepare_stream(name, body.postcopy, body.tls)
        return Response(status_code=204)

    @app.post("/v1/incoming/{name}/stream/listen", tags=["incoming"])
    async def incoming_stream_listen(name: VmName) -> dict[str, Any]:
        """QEMU listens for the stream on this host's migration address."""
        host, port = await inc.listen_stream(name)
        return {"host": host, "port": port}

    @app.get("/v1/incoming/{name}/stream", tags=["incoming"])
    async def incoming_stream_wait(
        name: VmName, wait: Annotated[float, Query(ge=0, le=3600)] = 0.0
    ) -> dict[str, Any]:
        """The incoming migration (once it ended, or after ``wait`` seconds)."""
        return await inc.wait_stream(name, wait)

    @app.post("/v1/incoming/{name}/disk-listener", tags=["incoming"])
    async def incoming_disk_listener(name: VmName) -> dict[str, str]:
        """Precopy: the disk service listens on this host's migration address for the mirror."""
        return {"address": await inc.listen_disks(name)}

    @app.post("/v1/incoming/{name}/relocations/{disk}/{action}", tags=["incoming"])
    async def incoming_relocation(
        name: VmName, disk: VmName, action: Annotated[str, Path(pattern="^(pause|resume|invalidate)$")]
    ) -> dict[str, Any]:
        """Pause, resume or (the switchover) invalidate a disk's relocation."""
        return await inc.relocation(name, disk, action)

    @app.get("/v1/incoming/{name}/disk-status", tags=["incoming"])
    async def incoming_disk_status(name: VmName) -> dict[str, Any]:
        """How each disk is served there now."""
        return await inc.disk_status(name)

    @app.get("/v1/incoming/{name}/disk-stats", tags=["incoming"])
    async def incoming_disk_stats(name: VmName) -> dict[str, Any]:
        """The disk service's request statistics."""
        return await inc.disk_stats(name)

    @app.post("/v1/incoming/{name}/patience", status_code=204, tags=["incoming"])
    async def incoming_patience(name: VmName, body: PatienceBody) -> Response:
        """How long a disk request waits for a lost source."""
        await inc.set_patience(name, body.seconds)
        return Response(status_code=204)

    @app.post("/v1/incoming/{name}/resume", status_code=204, tags=["incoming"])
    async def incoming_resume(name: VmName, body: ResumeBody | None = None) -> Response:
        """The guest runs here (after the source committed; in a cluster, with the owner key's token)."""
        await inc.resume(name, body.token if body else None)
        return Response(status_code=204)

    @app.post("/v1/incoming/{name}/announce", status_code=204, tags=["incoming"])
    async def incoming_announce(name: VmName) -> Response:
        """The VM's NICs announce their MACs from here."""
        await inc.announce(name)
        return Response(status_code=204)

    @app.get("/v1/incoming/{name}/status", tags=["incoming"])
    async def incoming_status(name: VmName) -> dict[str, Any]:
        """The incoming VM's supervisor status."""
        return await inc.status(name)

    @app.get("/v1/incoming/{name}/running", tags=["incoming"])
    async def incoming_running(name: VmName) -> dict[str, bool]:
        """Whether the incoming VM's supervisor runs."""
        return {"running": await inc.running(name)}

    @app.get("/v1/incoming/{name}/spec", tags=["incoming"])
    async def incoming_spec(name: VmName) -> dict[str, str]:
        """The incoming VM's spec (``vm.toml``)."""
        return {"toml": await inc.spec_toml(name)}

    @app.post("/v1/incoming/{name}/finish", status_code=204, tags=["incoming"])
    async def incoming_finish(name: VmName) -> Response:
        """The migration is done: the VM is this host's."""
        await inc.finish(name)
        return Response(status_code=204)

    @app.post("/v1/incoming/{name}/stop-serving", status_code=204, tags=["incoming"])
    async def incoming_stop_serving(name: VmName) -> Response:
        """A powered-off VM came home: stop serving its disks; the home is the VM's again."""
        await inc.stop_serving(name)
        return Response(status_code=204)

    @app.delete("/v1/incoming/{name}", status_code=204, tags=["incoming"])
    async def incoming_remove(name: VmName) -> Response:
        """Roll back: the incoming VM goes with its home (a VM coming home serves its disks again)."""
        await inc.remove(name)
        return Response(status_code=204)

    @app.post("/v1/held/{name}/release", status_code=204, tags=["incoming"])
    async def held_release(name: VmName, body: ReleaseBody) -> Response:
        """The VM no longer needs its disks held here (shared storage): they go."""
        await inc.release_held(name, body.migration)
        return Response(status_code=204)

    return app
