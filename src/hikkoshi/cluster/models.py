"""The values stored under the keys of :mod:`hikkoshi.cluster.keys`: JSON checked by pydantic.

Unknown fields are refused on purpose: a record written by a newer agent that this one cannot read
fails loudly (:class:`pydantic.ValidationError`) rather than being silently stripped on the next write.
"""

from __future__ import annotations

import time
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

from hikkoshi.migrate.phases import Phase


class Record(BaseModel):
    """A JSON value in etcd."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_bytes(self) -> bytes:
        """The bytes stored in etcd."""
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Parse and check the bytes read from etcd."""
        return cls.model_validate_json(raw)


def now() -> float:
    return time.time()


# -- hosts ------------------------------------------------------------------------------------------


class DatastoreInfo(Record):
    """A datastore a host serves: its stable uuid (the same store seen from two hosts has one uuid)."""

    name: str
    uuid: str
    capacity: int = Field(ge=0, description="bytes")


class HostInfo(Record):
    """What a host is: written when it registers, kept when it goes down."""

    name: str
    api_address: str
    migration_addresses: tuple[str, ...] = ()
    site: str = "default"
    cpu_model: str = ""
    memory_total: int = Field(ge=0, description="bytes")
    datastores: tuple[DatastoreInfo, ...] = ()
    registered_at: float = Field(default_factory=now)


class HostLoad(Record):
    """Load figures a host publishes (moving averages are the host's business)."""

    cpu: float = Field(default=0.0, ge=0.0, description="busy fraction of all cores, 0..1")
    vms: int = Field(default=0, ge=0)
    migrations_out: int = Field(default=0, ge=0)
    migrations_in: int = Field(default=0, ge=0)


class VmLoad(Record):
    """What one VM used over the host's recent window, one value per sample (oldest first)."""

    cpu: tuple[float, ...] = Field(default=(), description="cores busy (its QEMU threads' CPU time)")
    memory: tuple[int, ...] = Field(default=(), description="bytes resident (its QEMU process)")
    disk_read: tuple[float, ...] = Field(default=(), description="bytes/s read (its NBD service's stats)")
    disk_write: tuple[float, ...] = Field(default=(), description="bytes/s written (its NBD service's stats)")
    disk_latency_ms: tuple[float, ...] = Field(default=(), description="p99 request latency per sample (ms)")
    datastore: str | None = Field(default=None, description="uuid of the datastore of its disks")
    disk_allocated: int = Field(default=0, ge=0, description="bytes its disks take")
    network: tuple[float, ...] = Field(default=(), description="bytes/s through its NICs' taps")
    dirty_rate: float | None = Field(
        default=None, ge=0, description="bytes/s its memory is dirtied, last measured (QEMU calc-dirty-rate)"
    )


class HostStatus(Record):
    """How a host is doing now: under its lease, so it vanishes when the host stops renewing it."""

    agent: str = Field(default="", description="a nonce of the agent process (two agents of one name differ)")
    memory_free: int = Field(ge=0, description="bytes")
    datastores_free: dict[str, int] = Field(default_factory=dict, description="datastore uuid -> free bytes")
    load: HostLoad = HostLoad()
    vms: dict[str, str] = Field(default_factory=dict, description="VM uuid -> its state on this host")
    cpu_cores: int = Field(default=0, ge=0, description="cores VMs may use (0: not said)")
    vm_memory: int = Field(default=0, ge=0, description="bytes VMs may be given (0: not said)")
    vm_loads: dict[str, VmLoad] = Field(default_factory=dict, description="VM uuid -> its recent load")
    datastore_latency_p90: dict[str, tuple[float, ...]] = Field(
        default_factory=dict, description="datastore uuid -> p90 of its VMs' requests per sample (ms)"
    )
    sample_interval: float = Field(default=0.0, ge=0.0, description="seconds between load samples")
    updated_at: float = Field(default_factory=now)


class Maintenance(Record):
    """A host put in maintenance: no VM is placed on it, its VMs are to be moved away."""

    reason: str = ""
    since: float = Field(default_factory=now)


# -- VMs --------------------------------------------------------------------------------------------


class VmRecord(Record):
    """A VM the cluster knows: what placement needs of it, not its whole spec (that stays in its home)."""

    uuid: str
    name: str
    memory: int = Field(ge=0, description="bytes")
    vcpus: int = Field(default=1, ge=1)
    disk_bytes: int = Field(default=0, ge=0)
    datastore: str | None = Field(default=None, description="uuid of the datastore of its home")
    created_at: float = Field(default_factory=now)


class Owner(Record):
    """Who runs a VM. The key's mod revision is the fencing token, not anything in here."""

    host: str
    claim: str = Field(description="a nonce of the write, so a writer recognises its own write after a retry")
    since: float = Field(default_factory=now)


# -- migrations -------------------------------------------------------------------------------------


class JobRecord(Record):
    """A migration as the cluster sees it: any agent can read where it stands."""

    id: str
    vm: str = Field(description="VM uuid")
    source: str
    destination: str
    phase: Phase = Phase.PRECHECK
    resources: tuple[str, ...] = Field(default=(), description="the limited resources it takes slots of")
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)
    history: tuple[tuple[str, float], ...] = Field(default=(), description="(phase, time) as entered")
    error: str | None = None


class Coordinator(Record):
    """The host coordinating a migration, under the migration's lease."""

    host: str
    claim: str
    since: float = Field(default_factory=now)


# -- limits -----------------------------------------------------------------------------------------


class SlotHolder(Record):
    """A migration holding a slot of a resource."""

    job: str
    since: float = Field(default_factory=now)


class QueueEntry(Record):
    """A migration waiting for slots of these resources."""

    job: str
    resources: tuple[str, ...]
    since: float = Field(default_factory=now)


class Limits(Record):
    """How many migrations may hold a slot of a resource at once, by kind; ``overrides`` by resource name."""

    host_out: int = Field(default=2, ge=1)
    host_in: int = Field(default=2, ge=1)
    datastore: int = Field(default=4, ge=1)
    link: int = Field(default=1, ge=1, description="per pair of sites")
    cluster: int = Field(default=8, ge=1)
    overrides: dict[str, int] = Field(default_factory=dict)


# -- DRS --------------------------------------------------------------------------------------------


class LinkRecord(Record):
    """The network between two sites (the same site twice: the site's own) as the last migration
    between them measured it: what its memory stream got, and the round trip to the destination."""

    a: str
    b: str
    bandwidth: float = Field(gt=0, description="bytes/s the memory stream got (QEMU's mbps)")
    rtt_ms: float = Field(ge=0, description="TCP connect time to the destination agent, the least of a few")
    migration: str = Field(default="", description="the migration that measured it")
    measured_at: float = Field(default_factory=now)


class ObservationRecord(Record):
    """A completed live migration as the prediction learns from it
    (:mod:`hikkoshi.migrate.observation`): what was known before it, and what its report measured."""

    migration: str
    inputs: dict[str, Any] = Field(description="the prediction's inputs (observation.migration_json)")
    report: dict[str, Any] = Field(description="the report's figures the calibration reads")
    finished_at: float = Field(default_factory=now)


class RuleRecord(Record):
    """A placement rule (:class:`hikkoshi.drs.rules.Rule` as stored)."""

    name: str
    kind: str = Field(description="affinity, anti-affinity, run-on, not-run-on")
    vms: tuple[str, ...] = Field(description="VM names")
    hosts: tuple[str, ...] = ()
    strength: str = Field(default="must", description="must or should")
    created_at: float = Field(default_factory=now)


class ScheduleRecord(Record):
    """A migration to run at a time (once), or in a recurring window (each time it opens); run by the
    agent that owns the VM then, once per time (a transaction claims each run)."""

    id: str
    vm: str = Field(description="VM name")
    to: str = Field(description="destination host")
    at: float = Field(default=0.0, description="when (Unix time); a window's schedule: when it was added")
    window: str | None = Field(default=None, description="HH:MM-HH:MM (wall clock in tz), recurring")
    days: tuple[int, ...] = Field(default=(), description="window days, 0 = Monday (empty: every day)")
    tz: str = Field(default="UTC", description="the window's time zone (IANA name)")
    state: str = Field(default="pending", description="pending, started, done, failed, cancelled; recurring")
    storage: str = "hybrid"
    kind: str = Field(default="migrate", description="migrate (to a host) or storage (to a datastore)")
    datastore: str | None = Field(default=None, description="the datastore (name, on the host) disks go to")
    runner: str | None = Field(default=None, description="the host that ran it (last)")
    migration: str | None = Field(default=None, description="the (last) migration's id once started")
    outcome: str | None = Field(default=None, description="a window's last run: started, done, failed")
    last_run: float | None = Field(default=None, description="when it (last) started")
    error: str | None = None
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)


class RunMove(Record):
    """One move of an automatic DRS run, and the schedule that carries it out."""

    vm: str
    source: str
    target: str
    kind: str = Field(description="migrate, storage or offline")
    why: str
    reason: str
    schedule: str | None = Field(default=None, description="the schedule it was handed to (None: not run)")
    note: str | None = None


class DrsRunRecord(Record):
    """What one run of the automatic planner saw and did (kept: the last ``drs_records.KEEP_RUNS``)."""

    id: str
    at: float = Field(default_factory=now)
    leader: str
    level: int
    imbalance_before: float
    imbalance_after: float
    threshold: float
    moves: tuple[RunMove, ...] = ()
    notes: tuple[str, ...] = ()


class DrsSettings(Record):
    """How DRS runs in the cluster: the automatic planner's switch, level and interval."""

    auto: bool = False
    level: int = Field(default=3, ge=1, le=5)
    interval: float = Field(default=300.0, gt=0, description="seconds between automatic runs")
    max_moves: int = Field(default=8, ge=1, description="moves per run")
