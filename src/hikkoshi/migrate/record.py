"""The persisted record of one migration: its plan, its phase, what happened, and its report.

The coordinator writes the record (atomically) at every phase change, so a restarted coordinator
knows where each migration stood (:func:`hikkoshi.migrate.phases.recovery`), and ``migrations``
can list the history. Files: ``<state dir>/<id>.json``.
"""

from __future__ import annotations

import enum
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hikkoshi.migrate.phases import Phase, move
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.disk_serving import Holder
from hikkoshi.vm.home import write_atomically


class MigrationKind(enum.StrEnum):
    """How the VM moves."""

    LIVE = "live"
    """It runs throughout."""
    QUICK = "quick"
    """Suspended, moved, resumed."""
    COLD = "cold"
    """Powered off."""
    STORAGE = "storage"
    """Its home and disks move to another datastore of the same host while it runs."""


class MigrationSettings(BaseModel):
    """What was asked for (a job taken over after a crash carries on with the same)."""

    model_config = ConfigDict(extra="forbid")

    max_downtime_ms: int = 300
    bandwidth: int | None = None
    """Memory stream limit, bytes/s (``None``: unlimited)."""
    disk_bandwidth: str | None = None
    """Background disk copy limit of a relocation, e.g. ``50M``."""
    auto_converge: bool = True
    allow_postcopy: bool = False
    max_seconds: float = 600.0
    tls_dir: str | None = None
    """The source host's TLS files (QEMU's layout: an agent's host certificate, or given by hand)."""
    tls: bool = False
    """Whether every stream between the hosts is encrypted (the memory stream, the disks' NBD)."""
    destination_datastore: str | None = None
    """The destination datastore's name on its agent."""
    destination_site: str | None = None
    source_host: str = "local"
    source_agent: str | None = None
    cluster_job: bool = False
    """The migration is a cluster job: etcd has its record, and its commit moves the owner key."""
    move_mode: str = "mirror"
    """Storage migration: ``mirror`` or ``dbt``."""
    move_bandwidth: str | None = None
    thick: bool = False


class MigrationFacts(BaseModel):
    """What a migration learnt on its way that later phases, a rollback or a restarted job need."""

    model_config = ConfigDict(extra="forbid")

    accel: str | None = None
    """The source VM's accelerator (the destination gets the same)."""
    destination_home_created: bool = False
    """This migration made the destination's home (recorded first: a rollback removes only that)."""
    destination_takes_back: bool = False
    """The destination holds the VM's disks already (shared storage, the VM comes home): its serving
    supervisor takes QEMU up again; no home is made there and none removed on rollback."""
    destination_supervisor_pid: int | None = None
    source_listen: str | None = None
    """The extra address the source's disk service listens on for the destination."""
    exports: dict[str, str] = {}
    """Disk name: the source export URI the destination reaches."""
    geometry: dict[str, tuple[int, int, int]] = {}
    bitmap: str | None = None
    """The source's dirty bitmap of a hybrid or postcopy migration."""
    holders: list[Holder] = []
    """Hosts that hold the VM's disks for the source (shared storage) and are released at the end."""
    localized: list[str] = []
    """Disks a storage migration pulled in from their holder first."""
    dirty_rate_started: bool = False
    mirror_nodes: list[str] = []
    mirror_jobs: list[str] = []
    mirror_target: str | None = None
    """``host:port`` of the destination's disk listener precopy's mirrors write to (cut by a rollback)."""
    stream: str | None = None
    tls: bool = False
    """The source QEMU has the memory stream's TLS credentials (dropped by a rollback)."""
    mirror_tls: bool = False
    """The source QEMU has precopy's NBD TLS credentials (dropped by a rollback)."""
    routes: dict[str, str] = {}
    committed: bool = False
    """The source supervisor agreed that the destination may run (the commit)."""
    fencing_token: int | None = None
    """The token the destination resumes the VM with (a cluster's owner key revision)."""
    export_dir: str | None = None
    """Cold migration: the runtime directory of the source's read-only export."""
    moving: list[str] = []
    moved: dict[str, tuple[str, str]] = {}
    """Storage migration: disk name -> (old path, new path) of disks moved so far."""


class PhaseTime(BaseModel):
    """When a phase began and how long it took (wall clock: a record outlives the process)."""

    phase: Phase
    started: float
    seconds: float | None = None


class Endpoint(BaseModel):
    """One side of a migration on this machine's terms."""

    datastore: Path
    home: Path
    host: str = "local"
    """The host's name (its agent's; ``local`` by path)."""
    runtime_dir: Path | None = None
    address: str = "127.0.0.1"
    agent: str | None = None
    """The URL of the host's agent when the migration reaches that side through it."""


class MigrationRecord(BaseModel):
    """Everything known about one migration."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    vm: str
    kind: MigrationKind = MigrationKind.LIVE
    storage: StorageMode
    source: Endpoint
    destination: Endpoint
    settings: MigrationSettings = Field(default_factory=MigrationSettings)
    phase: Phase = Phase.PRECHECK
    phases: list[PhaseTime] = []
    created: float = Field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    facts: MigrationFacts = Field(default_factory=MigrationFacts)
    report: dict[str, Any] = {}

    def enter(self, phase: Phase, *, now: float | None = None) -> None:
        """Move to ``phase`` (the rules of :mod:`phases` apply) and time the phase that ends."""
        self.phase = move(self.phase, phase)
        now = time.time() if now is None else now
        if self.phases and self.phases[-1].seconds is None:
            self.phases[-1].seconds = round(now - self.phases[-1].started, 4)
        self.phases.append(PhaseTime(phase=phase, started=now))
        if phase in (Phase.DONE, Phase.ROLLED_BACK, Phase.FAILED):
            self.phases[-1].seconds = 0.0
            self.finished = now

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase (summed if a phase came twice, which the rules do not allow anyway)."""
        out: dict[str, float] = {}
        for p in self.phases:
            if p.seconds is not None:
                out[p.phase.value] = round(out.get(p.phase.value, 0.0) + p.seconds, 4)
        return out


class MigrationStore:
    """The records of one host's migrations."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, record: MigrationRecord) -> Path:
        """Write ``record`` (atomically)."""
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / f"{record.id}.json"
        write_atomically(target, record.model_dump_json(indent=2).encode())
        return target

    def load(self, migration_id: str) -> MigrationRecord:
        """One record; ``KeyError`` if there is none, ``ValueError`` if it is damaged."""
        path = self.path / f"{migration_id}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(migration_id) from None
        try:
            return MigrationRecord.model_validate_json(data)
        except ValidationError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def all(self) -> list[MigrationRecord]:
        """Every readable record, oldest first."""
        records = []
        for path in sorted(self.path.glob("*.json")) if self.path.is_dir() else []:
            try:
                records.append(self.load(path.stem))
            except (KeyError, ValueError):
                continue
        return sorted(records, key=lambda r: r.created)
