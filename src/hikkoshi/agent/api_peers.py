"""The routes for the other agents of the cluster: the incoming side of a migration (``/v1/incoming``),
disks held here for a VM running elsewhere (``/v1/held``), and what a peer may ask about this host
(``/v1/peer``). Only a caller with a host certificate of the cluster CA gets here (the API checks it
first); each operation is bound to the host that certificate names (``peer``). Every operation is typed:
no QMP, control verb, path or address is chosen by the caller.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from hikkoshi.agent.errors import Problem
from hikkoshi.agent.models import (
    CommittedBody,
    DiskListen,
    IncomingDisks,
    IncomingFacts,
    IncomingPull,
    IncomingStart,
    PatienceBody,
    PeerHost,
    PeerMigration,
    ReleaseBody,
    ResumeBody,
    StreamPrepare,
)
from hikkoshi.agent.service import Agent
from hikkoshi.agent.tls_server import peer_of_request
from hikkoshi.migrate.home_archive import MAX_ARCHIVE_BYTES
from hikkoshi.vm.disk_serving import DiskPlan

#: Paths only the cluster's agents reach (with their host certificates, never the token).
PEER_PREFIXES = ("/v1/incoming/", "/v1/held/", "/v1/peer/")

VmName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
MigrationId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
DatastoreName = Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


def _peer(request: Request) -> str:
    peer = peer_of_request(request)
    if peer is None:  # the API refused it before; never reached
        raise Problem("no host certificate")
    return peer


Peer = Annotated[str, Depends(_peer)]


def peer_router(agent: Agent) -> APIRouter:
    """The peer routes of ``agent``."""
    router = APIRouter(tags=["peers"])
    inc = agent.incoming

    # --- this host ----------------------------------------------------------------------------------------

    @router.get("/v1/peer/host", response_model=PeerHost)
    async def peer_host(_peer: Peer) -> PeerHost:
        """This host's name, site and datastores (a migration's source picks one)."""
        return agent.jobs.peer_host()

    @router.get("/v1/peer/migrations/{migration_id}", response_model=PeerMigration)
    async def peer_migration(migration_id: MigrationId, peer: Peer) -> PeerMigration:
        """How a migration from here to the asking host ended (it cleans up what it was left)."""
        return agent.jobs.outcome_for(migration_id, peer)

    # --- a VM coming in -----------------------------------------------------------------------------------

    @router.get("/v1/incoming/{name}", response_model=IncomingFacts)
    async def incoming_facts(name: VmName, peer: Peer, datastore: DatastoreName = None) -> IncomingFacts:
        """What a migration's precheck needs to know about this host."""
        return await inc.facts(name, datastore, peer)

    @router.put(
        "/v1/incoming/{name}/home",
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
        peer: Peer,
        datastore: DatastoreName = None,
        source: Annotated[str | None, Query(max_length=300, pattern=r"^https://[^\s/]+(/.*)?$")] = None,
    ) -> dict[str, int]:
        """Make the VM's home from a tar archive of its files (disks aside); its spec is checked as a
        user's would be."""
        limit = MAX_ARCHIVE_BYTES + (1 << 20)
        if int(request.headers.get("content-length") or 0) > limit:
            raise Problem(f"the archive is larger than {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise Problem(f"the archive is larger than {limit} bytes")
        return {"bytes": await inc.create_home(name, datastore, bytes(data), source, peer)}

    @router.post("/v1/incoming/{name}/disks", status_code=204)
    async def incoming_disks(name: VmName, body: IncomingDisks, peer: Peer) -> Response:
        """Empty disks for a mirror to fill."""
        await inc.create_disks(name, body.sizes, peer)
        return Response(status_code=204)

    @router.post("/v1/incoming/{name}/pull")
    async def incoming_pull(name: VmName, body: IncomingPull, peer: Peer) -> dict[str, dict[str, Any]]:
        """Cold migration: copy the disks from the asking host's read-only export; answers when they are
        complete and flushed."""
        return await inc.pull(name, {n: (d.uri, d.size) for n, d in body.disks.items()}, peer)

    @router.put("/v1/incoming/{name}/plan", status_code=204)
    async def incoming_plan(name: VmName, body: DiskPlan, peer: Peer) -> Response:
        """How each disk will be served (read from the asking host only)."""
        await inc.save_plan(name, body, peer)
        return Response(status_code=204)

    @router.post("/v1/incoming/{name}/start")
    async def incoming_start(name: VmName, body: IncomingStart, peer: Peer) -> dict[str, Any]:
        """Start the incoming supervisor (or let this host's serving one take the VM back)."""
        return await inc.start(name, body.accel, body.migration, body.source, peer)

    @router.post("/v1/incoming/{name}/stream", status_code=204)
    async def incoming_stream(name: VmName, body: StreamPrepare, peer: Peer) -> Response:
        """Prepare QEMU's side of the memory stream: TLS with this host's certificate, accepting the
        asking host's only."""
        await inc.prepare_stream(name, body.postcopy, body.tls, peer)
        return Response(status_code=204)

    @router.post("/v1/incoming/{name}/stream/listen")
    async def incoming_stream_listen(name: VmName, peer: Peer) -> dict[str, Any]:
        """QEMU listens for the stream on this host's migration address."""
        host, port = await inc.listen_stream(name, peer)
        return {"host": host, "port": port}

    @router.get("/v1/incoming/{name}/stream")
    async def incoming_stream_wait(
        name: VmName, peer: Peer, wait: Annotated[float, Query(ge=0, le=3600)] = 0.0
    ) -> dict[str, Any]:
        """The incoming migration (once it ended, or after ``wait`` seconds)."""
        return await inc.wait_stream(name, wait, peer)

    @router.post("/v1/incoming/{name}/disk-listener")
    async def incoming_disk_listener(name: VmName, body: DiskListen, peer: Peer) -> dict[str, str]:
        """Precopy: the disk service listens on this host's migration address for the asking host's
        mirror (its certificate only, this migration only)."""
        return {"address": await inc.listen_disks(name, body.migration, body.tls, peer)}

    @router.post("/v1/incoming/{name}/relocations/{disk}/{action}")
    async def incoming_relocation(
        name: VmName,
        disk: VmName,
        action: Annotated[str, Path(pattern="^(pause|resume|invalidate)$")],
        peer: Peer,
    ) -> dict[str, Any]:
        """Pause, resume or (the switchover) invalidate a disk's relocation."""
        return await inc.relocation(name, disk, action, peer)

    @router.get("/v1/incoming/{name}/disk-status")
    async def incoming_disk_status(name: VmName, peer: Peer) -> dict[str, Any]:
        """How each disk is served there now."""
        return await inc.disk_status(name, peer)

    @router.get("/v1/incoming/{name}/disk-stats")
    async def incoming_disk_stats(name: VmName, peer: Peer) -> dict[str, Any]:
        """The disk service's request statistics."""
        return await inc.disk_stats(name, peer)

    @router.post("/v1/incoming/{name}/patience", status_code=204)
    async def incoming_patience(name: VmName, body: PatienceBody, peer: Peer) -> Response:
        """How long a disk request waits for a lost source."""
        await inc.set_patience(name, body.seconds, peer)
        return Response(status_code=204)

    @router.post("/v1/incoming/{name}/resume", status_code=204)
    async def incoming_resume(name: VmName, peer: Peer, body: ResumeBody | None = None) -> Response:
        """The guest runs here (after the source committed; in a cluster, with the owner key's token)."""
        await inc.resume(name, peer, body.token if body else None)
        return Response(status_code=204)

    @router.post("/v1/incoming/{name}/committed", status_code=204)
    async def incoming_committed(name: VmName, body: CommittedBody, peer: Peer) -> Response:
        """The migration committed here, but the VM died before it resumed: it may be started here."""
        await inc.committed(name, peer, body.migration, body.token)
        return Response(status_code=204)

    @router.post("/v1/incoming/{name}/announce", status_code=204)
    async def incoming_announce(name: VmName, peer: Peer) -> Response:
        """The VM's NICs announce their MACs from here."""
        await inc.announce(name, peer)
        return Response(status_code=204)

    @router.get("/v1/incoming/{name}/status")
    async def incoming_status(name: VmName, peer: Peer) -> dict[str, Any]:
        """The incoming VM's supervisor status."""
        return await inc.status(name, peer)

    @router.get("/v1/incoming/{name}/running")
    async def incoming_running(name: VmName, peer: Peer) -> dict[str, bool]:
        """Whether the incoming VM's supervisor runs."""
        return {"running": await inc.running(name, peer)}

    @router.get("/v1/incoming/{name}/spec")
    async def incoming_spec(name: VmName, peer: Peer) -> dict[str, str]:
        """The incoming VM's spec (``vm.toml``)."""
        return {"toml": await inc.spec_toml(name, peer)}

    @router.post("/v1/incoming/{name}/finish", status_code=204)
    async def incoming_finish(name: VmName, peer: Peer) -> Response:
        """The migration is done: the VM is this host's."""
        await inc.finish(name, peer)
        return Response(status_code=204)

    @router.post("/v1/incoming/{name}/stop-serving", status_code=204)
    async def incoming_stop_serving(name: VmName, peer: Peer) -> Response:
        """A powered-off VM came home: stop serving its disks; the home is the VM's again."""
        await inc.stop_serving(name, peer)
        return Response(status_code=204)

    @router.delete("/v1/incoming/{name}", status_code=204)
    async def incoming_remove(name: VmName, peer: Peer) -> Response:
        """Roll back: the incoming VM goes with its home (a VM coming home serves its disks again)."""
        await inc.remove(name, peer)
        return Response(status_code=204)

    # --- disks held here ----------------------------------------------------------------------------------

    @router.post("/v1/held/{name}/release", status_code=204)
    async def held_release(name: VmName, body: ReleaseBody, peer: Peer) -> Response:
        """The VM (running on the asking host) no longer needs its disks held here: they go."""
        await inc.release_held(name, body.migration, peer)
        return Response(status_code=204)

    return router
