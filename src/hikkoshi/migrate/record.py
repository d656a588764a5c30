"""The persisted record of one migration: its plan, its phase, what happened, and its report.

The coordinator writes the record (atomically) at every phase change, so a restarted coordinator
knows where each migration stood (:func:`hikkoshi.migrate.phases.recovery`), and ``migrations``
can list the history. Files: ``<state dir>/<id>.json``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from hikkoshi.migrate.phases import Phase, move
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.home import write_atomically


class PhaseTime(BaseModel):
    """When a phase began and how long it took (wall clock: a record outlives the process)."""

    phase: Phase
    started: float
    seconds: float | None = None


class Endpoint(BaseModel):
    """One side of a migration on this machine's terms."""

    datastore: Path
    home: Path
    runtime_dir: Path | None = None
    address: str = "127.0.0.1"
    agent: str | None = None
    """The URL of the host's agent when the migration reaches that side through it."""


class MigrationRecord(BaseModel):
    """Everything known about one migration."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    vm: str
    kind: Literal["live", "cold", "quick", "storage"] = "live"
    """live: the VM runs throughout; cold: it is powered off; quick: suspended, moved, resumed;
    storage: its home and disks move to another datastore of the same host while it runs."""
    storage: StorageMode
    source: Endpoint
    destination: Endpoint
    settings: dict[str, Any] = {}
    phase: Phase = Phase.PRECHECK
    phases: list[PhaseTime] = []
    created: float = Field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    #: Facts the coordinator learnt that a restarted one needs (export URIs, ports, job names).
    facts: dict[str, Any] = {}
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
