"""What the cluster's listings show: hosts, VMs, migrations and the queue as rows. Pure.

The records in etcd are joined here, without I/O: a VM's row takes its owner from the owner key and
its state from what that owner publishes (:attr:`HostStatus.vms`), so a VM whose owner is down is
``unknown``, never a stale ``running``. The callers read the records (``list_hosts``,
``Ownership.list_vms``, ``Jobs.list``, ``Slots.queue``) and hand them in; the shapes they need are
protocols, so this module depends on the records only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from hikkoshi.cluster.host_view import HostState, HostView
from hikkoshi.cluster.models import JobRecord, QueueEntry, VmRecord
from hikkoshi.migrate.phases import Phase

UNKNOWN = "unknown"
"""A VM's state when its owner is down, unregistered, or does not publish it (yet)."""
NO_OWNER = "no-owner"
"""A VM recorded without an owner key (half created or half removed)."""
QUEUED = "queued"
"""A migration waiting in the queue for slots."""


class OwnedVm(Protocol):
    """A VM record and the host its owner key names (``Ownership.list_vms``' rows)."""

    @property
    def vm(self) -> VmRecord: ...

    @property
    def owner(self) -> str | None: ...


class CoordinatedJob(Protocol):
    """A migration record and its coordinator (``Jobs.list``' rows)."""

    @property
    def record(self) -> JobRecord: ...

    @property
    def coordinator(self) -> str | None: ...


class Waiting(Protocol):
    """A queued migration: its place (0 = head), entry and reasons (``Slots.queue``' rows)."""

    @property
    def position(self) -> int: ...

    @property
    def entry(self) -> QueueEntry: ...

    @property
    def reasons(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class DatastoreRow:
    """A host's datastore: capacity and (while the host is up) free bytes."""

    name: str
    uuid: str
    capacity: int
    free: int | None


@dataclass(frozen=True)
class HostRow:
    """A host as ``host list`` and ``host show`` print it; figures are None while it is down."""

    name: str
    state: str
    site: str
    api_address: str
    cpu_model: str
    memory_total: int
    memory_free: int | None
    vms: int | None
    """VMs it publishes (any state)."""
    vms_running: int | None
    cpu: float | None
    """Busy fraction of all its cores, 0..1."""
    migrations_in: int | None
    migrations_out: int | None
    datastores: tuple[DatastoreRow, ...]
    maintenance: str | None
    """Why it is in maintenance (None: it is not)."""
    registered_at: float
    updated_at: float | None


def host_row(view: HostView) -> HostRow:
    """One host's row."""
    info, st = view.info, view.status
    free = st.datastores_free if st is not None else {}
    return HostRow(
        name=info.name,
        state=view.state.value,
        site=info.site,
        api_address=info.api_address,
        cpu_model=info.cpu_model,
        memory_total=info.memory_total,
        memory_free=st.memory_free if st else None,
        vms=len(st.vms) if st else None,
        vms_running=sum(1 for s in st.vms.values() if s == "running") if st else None,
        cpu=st.load.cpu if st else None,
        migrations_in=st.load.migrations_in if st else None,
        migrations_out=st.load.migrations_out if st else None,
        datastores=tuple(DatastoreRow(d.name, d.uuid, d.capacity, free.get(d.uuid)) for d in info.datastores),
        maintenance=view.maintenance.reason if view.maintenance is not None else None,
        registered_at=info.registered_at,
        updated_at=st.updated_at if st else None,
    )


def host_rows(hosts: Iterable[HostView]) -> list[HostRow]:
    """Every host's row, by name."""
    return sorted((host_row(h) for h in hosts), key=lambda r: r.name)


@dataclass(frozen=True)
class VmRow:
    """A VM as ``vm list`` prints it."""

    name: str
    uuid: str
    host: str | None
    """The host its owner key names."""
    state: str
    memory: int
    vcpus: int
    disk_bytes: int
    datastore: str | None
    """Its datastore's name on its host (its uuid if the host does not list it; None if unknown)."""


def vm_state(uuid: str, owner: str | None, hosts: Mapping[str, HostView]) -> str:
    """A VM's state as its owner publishes it; ``unknown`` when the owner cannot say."""
    if owner is None:
        return NO_OWNER
    view = hosts.get(owner)
    if view is None or view.state is HostState.DOWN or view.status is None:
        return UNKNOWN
    return view.status.vms.get(uuid, UNKNOWN)


def _datastore_name(uuid: str | None, host: HostView | None) -> str | None:
    if uuid is None:
        return None
    if host is not None:
        for d in host.info.datastores:
            if d.uuid == uuid:
                return d.name
    return uuid


def vm_rows(vms: Iterable[OwnedVm], hosts: Iterable[HostView]) -> list[VmRow]:
    """Every VM's row, by name: owner from its owner key, state from its owner's published status."""
    by_name = {h.info.name: h for h in hosts}
    rows = []
    for v in vms:
        rec = v.vm
        rows.append(
            VmRow(
                name=rec.name,
                uuid=rec.uuid,
                host=v.owner,
                state=vm_state(rec.uuid, v.owner, by_name),
                memory=rec.memory,
                vcpus=rec.vcpus,
                disk_bytes=rec.disk_bytes,
                datastore=_datastore_name(rec.datastore, by_name.get(v.owner or "")),
            )
        )
    return sorted(rows, key=lambda r: (r.name, r.uuid))


@dataclass(frozen=True)
class MigrationRow:
    """A migration as ``migrations`` prints it."""

    id: str
    vm: str
    """The VM's name (its uuid when the VM is no longer recorded)."""
    vm_uuid: str
    source: str
    destination: str
    phase: str
    """The recorded phase, or ``queued`` while it waits in the queue."""
    coordinator: str | None
    """The host coordinating it now (None: nobody; finished, or its coordinator died)."""
    age: float
    """Seconds since it was recorded."""
    updated_at: float
    error: str | None
    resources: tuple[str, ...]


@dataclass(frozen=True)
class QueueRow:
    """A waiting migration: its place (1 = next), VM, what it waits for and why."""

    place: int
    job: str
    vm: str | None
    resources: tuple[str, ...]
    reasons: tuple[str, ...]
    waited: float
    """Seconds since it joined the queue."""


def vm_names(vms: Iterable[OwnedVm]) -> dict[str, str]:
    """VM uuid -> name."""
    return {v.vm.uuid: v.vm.name for v in vms}


def migration_rows(
    jobs: Iterable[CoordinatedJob], names: Mapping[str, str], now: float, queued: Iterable[str] = ()
) -> list[MigrationRow]:
    """Every migration's row, oldest first; ``names``: VM uuid -> name; ``queued``: ids in the queue."""
    waiting = set(queued)
    rows = []
    for j in jobs:
        rec = j.record
        phase = QUEUED if rec.id in waiting and rec.phase is Phase.PRECHECK else rec.phase.value
        rows.append(
            MigrationRow(
                id=rec.id,
                vm=names.get(rec.vm, rec.vm),
                vm_uuid=rec.vm,
                source=rec.source,
                destination=rec.destination,
                phase=phase,
                coordinator=j.coordinator,
                age=max(0.0, now - rec.created_at),
                updated_at=rec.updated_at,
                error=rec.error,
                resources=rec.resources,
            )
        )
    return sorted(rows, key=lambda r: (-r.age, r.id))


def queue_rows(
    places: Iterable[Waiting], jobs: Iterable[CoordinatedJob], names: Mapping[str, str], now: float
) -> list[QueueRow]:
    """The queue, head first (place 1), with each waiter's VM when its record says."""
    vm_of = {j.record.id: names.get(j.record.vm, j.record.vm) for j in jobs}
    return [
        QueueRow(
            place=p.position + 1,
            job=p.entry.job,
            vm=vm_of.get(p.entry.job),
            resources=p.entry.resources,
            reasons=tuple(p.reasons),
            waited=max(0.0, now - p.entry.since),
        )
        for p in sorted(places, key=lambda p: p.position)
    ]
