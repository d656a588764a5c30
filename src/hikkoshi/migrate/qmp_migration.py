"""The QMP commands a migration sends, typed, in one place: QEMU's migration states as an enum, what
``query-migrate`` answers as a dataclass, and one function per command.

Each function takes a :class:`QmpPort`: whatever runs a QMP command on one QEMU (a VM's supervisor on
this host). Nothing else in :mod:`hikkoshi.migrate` spells a QMP command; peers never get a port at all:
a destination is driven through typed operations (:mod:`destination`).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

#: QEMU object id of a migration's TLS credentials.
TLS_ID = "hikkoshi-migration-tls"
#: QEMU object id of the check that the stream comes from the expected host (destination side).
AUTHZ_ID = "hikkoshi-migration-authz"
#: QEMU object id of the TLS credentials of precopy's NBD mirror targets (source side).
MIRROR_TLS_ID = "hikkoshi-mirror-tls"


class MigrationStatus(enum.StrEnum):
    """QEMU's ``MigrationStatus``."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    @classmethod
    def of(cls, value: object) -> MigrationStatus:
        """The status QEMU named (``none`` for anything unknown or missing)."""
        try:
            return cls(str(value))
        except ValueError:
            return cls.NONE


TERMINAL = frozenset({MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED})
#: States in which a cancel lets the guest run on at the source.
CANCELLABLE = frozenset(
    {
        MigrationStatus.SETUP,
        MigrationStatus.ACTIVE,
        MigrationStatus.PRE_SWITCHOVER,
        MigrationStatus.DEVICE,
        MigrationStatus.WAIT_UNPLUG,
    }
)


@dataclass(frozen=True)
class RamInfo:
    """The ``ram`` part of ``query-migrate``."""

    transferred: int = 0
    remaining: int = 0
    total: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    postcopy_requests: int = 0

    @classmethod
    def of(cls, data: object) -> RamInfo:
        d = data if isinstance(data, dict) else {}
        return cls(
            transferred=int(d.get("transferred", 0)),
            remaining=int(d.get("remaining", 0)),
            total=int(d.get("total", 0)),
            dirty_sync_count=int(d.get("dirty-sync-count", 0)),
            dirty_pages_rate=int(d.get("dirty-pages-rate", 0)),
            mbps=float(d.get("mbps", 0.0)),
            postcopy_requests=int(d.get("postcopy-requests", 0)),
        )


@dataclass(frozen=True)
class MigrationInfo:
    """What ``query-migrate`` answered."""

    status: MigrationStatus
    ram: RamInfo = RamInfo()
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    throttle_percent: int = 0
    error: str | None = None
    listening: tuple[tuple[str, int], ...] = ()
    """An incoming migration's listening sockets (host, port)."""
    timed_out: bool = False
    """A wait ended by its time limit, not by a state it waited for."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, data: object) -> MigrationInfo:
        d = data if isinstance(data, dict) else {}
        listening = tuple(
            (str(a.get("host", "")), int(a.get("port", 0)))
            for a in d.get("socket-address") or []
            if isinstance(a, dict) and a.get("port")
        )
        return cls(
            status=MigrationStatus.of(d.get("status")),
            ram=RamInfo.of(d.get("ram")),
            total_time_ms=d.get("total-time"),
            downtime_ms=d.get("downtime"),
            setup_time_ms=d.get("setup-time"),
            throttle_percent=int(d.get("cpu-throttle-percentage", 0)),
            error=d.get("error-desc"),
            listening=listening,
            timed_out=bool(d.get("timed_out", False)),
            raw=dict(d),
        )

    @property
    def terminal(self) -> bool:
        """Whether the migration ended (completed, failed or cancelled)."""
        return self.status in TERMINAL


@dataclass(frozen=True)
class BlockJob:
    """One entry of ``query-block-jobs``."""

    device: str
    offset: int
    length: int
    ready: bool

    @classmethod
    def of(cls, data: dict[str, Any]) -> BlockJob:
        return cls(
            str(data.get("device", "")),
            int(data.get("offset", 0)),
            int(data.get("len", 0)),
            bool(data.get("ready", False)),
        )


class QmpPort(Protocol):
    """Runs QMP commands on one QEMU."""

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; its return value."""

    async def wait_migration(self, states: list[str], limit: float) -> dict[str, Any]:
        """``query-migrate`` once the migration is in one of ``states`` (or after ``limit`` s)."""


# --- the migration stream -----------------------------------------------------------------------------------


async def set_capabilities(port: QmpPort, **caps: bool) -> None:
    """``migrate-set-capabilities`` (names with ``_`` for ``-``)."""
    items = [{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]
    await port.qmp("migrate-set-capabilities", {"capabilities": items})


async def set_parameters(port: QmpPort, **params: int | str) -> None:
    """``migrate-set-parameters`` (names with ``_`` for ``-``)."""
    await port.qmp("migrate-set-parameters", {k.replace("_", "-"): v for k, v in params.items()})


async def start(port: QmpPort, uri: str) -> None:
    """``migrate``: send the VM's state to ``uri`` (``tcp:HOST:PORT``)."""
    await port.qmp("migrate", {"uri": uri})


async def listen(port: QmpPort, uri: str) -> MigrationInfo:
    """``migrate-incoming`` on ``uri`` (``tcp:HOST:0``: a free port); what QEMU then listens on."""
    await port.qmp("migrate-incoming", {"uri": uri})
    return await query(port)


async def continue_switchover(port: QmpPort) -> None:
    """``migrate-continue`` from ``pre-switchover``: QEMU sends the rest."""
    await port.qmp("migrate-continue", {"state": MigrationStatus.PRE_SWITCHOVER.value})


async def cancel(port: QmpPort) -> None:
    """``migrate_cancel``."""
    await port.qmp("migrate_cancel")


async def start_postcopy(port: QmpPort) -> None:
    """``migrate-start-postcopy``: the destination runs, pages follow on demand."""
    await port.qmp("migrate-start-postcopy")


async def query(port: QmpPort) -> MigrationInfo:
    """``query-migrate``."""
    return MigrationInfo.of(await port.qmp("query-migrate"))


async def wait(port: QmpPort, states: Iterable[MigrationStatus], limit: float) -> MigrationInfo:
    """The migration once it is in one of ``states`` (``timed_out`` after ``limit`` seconds)."""
    return MigrationInfo.of(await port.wait_migration([s.value for s in states], limit))


async def add_tls(port: QmpPort, directory: str, endpoint: str, object_id: str = TLS_ID) -> None:
    """TLS credentials (QEMU's x509 layout in ``directory``), verifying the peer's certificate."""
    await port.qmp(
        "object-add",
        {
            "qom-type": "tls-creds-x509",
            "id": object_id,
            "dir": directory,
            "endpoint": endpoint,
            "verify-peer": True,
        },
    )


async def accept_only(port: QmpPort, identity: str) -> None:
    """The incoming stream is accepted from a client certificate with this distinguished name only
    (QEMU's ``tls-authz``; GnuTLS spells the name in certificate order, e.g. ``O=...,CN=host``)."""
    await port.qmp("object-add", {"qom-type": "authz-simple", "id": AUTHZ_ID, "identity": identity})
    await set_parameters(port, tls_authz=AUTHZ_ID)


async def drop_tls(port: QmpPort) -> None:
    """Forget the migration's TLS settings and credentials (a later attempt adds its own)."""
    await set_parameters(port, tls_creds="", tls_hostname="")
    await port.qmp("object-del", {"id": TLS_ID})


async def forget_incoming_tls(port: QmpPort) -> None:
    """Drop the TLS settings and objects a QEMU kept from the migration that brought it here (its
    server credentials and the check of the source's name): a QEMU that came in encrypted can then
    leave encrypted, with a client's credentials under the same id."""
    objects = {str(o.get("name")) for o in await port.qmp("qom-list", {"path": "/objects"})}
    if not objects & {TLS_ID, AUTHZ_ID}:
        return
    await set_parameters(port, tls_creds="", tls_hostname="", tls_authz="")
    for object_id in (TLS_ID, AUTHZ_ID):
        if object_id in objects:
            await port.qmp("object-del", {"id": object_id})


async def drop_object(port: QmpPort, object_id: str) -> None:
    """``object-del``."""
    await port.qmp("object-del", {"id": object_id})


# --- the guest ----------------------------------------------------------------------------------------------


async def run_state(port: QmpPort) -> str:
    """``query-status``: ``running``, ``paused``, ``postmigrate``, ``inmigrate``, ..."""
    return str((await port.qmp("query-status"))["status"])


async def cont(port: QmpPort) -> None:
    """``cont``: the guest runs."""
    await port.qmp("cont")


async def announce(port: QmpPort) -> None:
    """Gratuitous RARPs from the VM's MACs, so switches learn its new port."""
    await port.qmp("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})


#: Idle: nothing migrates (a measurement then cannot be in a migration's way).
IDLE = frozenset({MigrationStatus.NONE, *TERMINAL})


async def calc_dirty_rate(port: QmpPort, seconds: int, mode: str | None = None) -> None:
    """Start measuring the guest's memory dirty rate over ``seconds`` (QEMU's default mode samples
    pages; ``dirty-bitmap`` counts every page dirtied through the dirty log, and kills QEMU 7.2 under TCG:
    see :mod:`hikkoshi.agent.load_sampler`)."""
    arguments: dict[str, Any] = {"calc-time": seconds}
    if mode is not None:
        arguments["mode"] = mode
    await port.qmp("calc-dirty-rate", arguments)


async def dirty_rate_settled(port: QmpPort, limit: float) -> None:
    """Once no dirty-rate measurement runs (a load sampler's may, for up to its second), or ``limit``
    s: QEMU refuses a second measurement while one runs, and a migration wants its own."""
    deadline = time.monotonic() + limit
    while (await port.qmp("query-dirty-rate")).get("status") == "measuring":
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.1)


async def dirty_rate(port: QmpPort) -> float | None:
    """The measured dirty rate (MiB/s), or ``None`` if not measured (yet)."""
    info = await port.qmp("query-dirty-rate")
    if info.get("status") != "measured":
        return None
    rate = info.get("dirty-rate")
    return float(rate) if rate is not None else None


async def device_geometry(port: QmpPort, device: str) -> tuple[int, int, int] | None:
    """A block device's (cylinders, heads, sectors) as its guest saw them, if QEMU says."""
    path = f"/machine/peripheral/{device}"
    values = [await port.qmp("qom-get", {"path": path, "property": p}) for p in ("cyls", "heads", "secs")]
    if all(isinstance(v, int) and v > 0 for v in values):
        return values[0], values[1], values[2]
    return None


# --- disk mirrors (precopy) ---------------------------------------------------------------------------------


async def add_nbd_target(
    port: QmpPort,
    node: str,
    host: str,
    tcp_port: int,
    export: str,
    *,
    tls_creds: str | None = None,
    tls_hostname: str | None = None,
) -> None:
    """A block node writing to an NBD export (a mirror's target); with ``tls_creds`` (an x509 object of
    endpoint ``client``) over TLS, the server's certificate naming ``tls_hostname`` (default: ``host``)."""
    args: dict[str, Any] = {
        "driver": "nbd",
        "node-name": node,
        "server": {"type": "inet", "host": host, "port": str(tcp_port)},
        "export": export,
    }
    if tls_creds is not None:
        args["tls-creds"] = tls_creds
        if tls_hostname is not None:
            args["tls-hostname"] = tls_hostname
    await port.qmp("blockdev-add", args)


async def delete_node(port: QmpPort, node: str) -> None:
    """``blockdev-del``."""
    await port.qmp("blockdev-del", {"node-name": node})


async def mirror(port: QmpPort, job: str, device: str, target: str) -> None:
    """A write-blocking full mirror of ``device`` into ``target`` (libvirt's way: it always converges)."""
    await port.qmp(
        "blockdev-mirror",
        {
            "job-id": job,
            "device": device,
            "target": target,
            "sync": "full",
            "copy-mode": "write-blocking",
        },
    )


async def block_jobs(port: QmpPort) -> list[BlockJob]:
    """``query-block-jobs``."""
    return [BlockJob.of(j) for j in await port.qmp("query-block-jobs")]


async def cancel_block_job(port: QmpPort, job: str, *, force: bool = False) -> None:
    """``block-job-cancel``: a ready mirror cancelled leaves its target in sync (the guest stopped)."""
    args: dict[str, Any] = {"device": job}
    if force:
        args["force"] = True
    await port.qmp("block-job-cancel", args)
