"""What the dashboard's pages show, as data: hosts, VMs, migrations and DRS recommendations, whatever
the source (agents, or the cluster in etcd). Pure."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class DatastoreView(BaseModel):
    """One datastore of a host."""

    name: str
    total_bytes: int = 0
    free_bytes: int = 0


class HostView(BaseModel):
    """A host: its agent, its state, and what it has."""

    name: str
    url: str
    """Its agent's URL (where actions for it go)."""
    state: str
    """``up``, ``unreachable`` (its agent does not answer), ``down`` (the cluster's lease lapsed) or
    ``maintenance``."""
    site: str = ""
    accel: str = ""
    memory_total: int = 0
    memory_available: int = 0
    cpu_count: int = 0
    load_average: list[float] = []
    datastores: list[DatastoreView] = []
    vms: int = 0
    maintenance_reason: str | None = None
    error: str | None = None


class DiskView(BaseModel):
    """A VM's disk."""

    name: str
    size: int
    provisioning: str = ""


class VmView(BaseModel):
    """A VM where a host's agent sees it."""

    name: str
    host: str
    """The host whose datastore holds it (where it runs, or is held, or arrives)."""
    state: str
    datastore: str = ""
    memory_mib: int | None = None
    cpus: int | None = None
    disks: list[DiskView] = []
    owner: str | None = None
    """The host that owns it: the cluster's owner key, else the host that holds it."""
    last_dirty_rate_mib_s: float | None = None
    """The guest's dirty rate measured by its last migration, if any (for predictions)."""

    @property
    def movable(self) -> bool:
        """Whether a person may start a migration of it here (not while it arrives or is held)."""
        return self.state in ("running", "stopped", "paused")


class MigrationView(BaseModel):
    """A migration as the agent that runs it reports it."""

    id: str
    host: str
    """The host whose agent runs it (the source)."""
    vm: str
    kind: str
    storage: str
    phase: str
    state: str
    """``queued``, ``running``, ``rolling back``, ``done``, ``failed`` or ``rolled back``."""
    running: bool
    created: float
    finished: float | None = None
    error: str | None = None
    destination: str | None = None
    """The destination host's name (its agent's URL when the name is not known)."""
    progress: dict[str, Any] = {}
    report: dict[str, Any] = {}
    record: dict[str, Any] = {}

    @property
    def in_flight(self) -> bool:
        """Not ended yet."""
        return self.state not in ("done", "failed", "rolled back")


class Recommendation(BaseModel):
    """A move DRS recommends."""

    id: str
    vm: str
    source: str
    destination: str
    reason: str


class Overview(BaseModel):
    """Everything the overview pages show, read in one go."""

    hosts: list[HostView]
    vms: list[VmView]
    migrations: list[MigrationView]
