"""The agent's state in SQLite: the VMs it knows, its migrations (the full records the migration jobs
save at every phase change) and the samples of each migration's timeline.

One connection, used from the agent's event loop only; WAL with ``synchronous=FULL``: a record saved
before a phase's first step is on disk when that step runs, so a restarted agent knows where each
migration stood. The datastores stay the truth about which VMs exist; the database remembers what
the agent did with them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hikkoshi.migrate.record import MigrationRecord, MigrationStore

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    datastore TEXT NOT NULL,
    uuid TEXT,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    kind TEXT NOT NULL,
    role TEXT NOT NULL,
    phase TEXT NOT NULL,
    created REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    migration TEXT NOT NULL,
    t REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_migration ON samples (migration, t);
"""


class StateError(RuntimeError):
    """The state database cannot be used (a newer schema, or damaged)."""


class AgentDb:
    """The agent's SQLite database (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state database {path}: {exc}") from None
        if row is None:
            self.conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise StateError(
                f"state database {path} has schema {row[0]}; this hikkoshi knows {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        """Close the database."""
        self.conn.close()

    # --- VMs ----------------------------------------------------------------------------------------------

    def set_vm(self, name: str, datastore: str, uuid: str | None, state: str, detail: str = "") -> None:
        """Remember a VM's datastore and last known state."""
        self.conn.execute(
            "INSERT INTO vms VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
            "datastore = excluded.datastore, uuid = excluded.uuid, state = excluded.state, "
            "detail = excluded.detail, updated = excluded.updated",
            (name, datastore, uuid, state, detail, time.time()),
        )

    def forget_vm(self, name: str) -> None:
        """The VM left this host (destroyed, or migrated away)."""
        self.conn.execute("DELETE FROM vms WHERE name = ?", (name,))

    def vms(self) -> dict[str, dict[str, Any]]:
        """Every remembered VM by name."""
        rows = self.conn.execute("SELECT name, datastore, uuid, state, detail, updated FROM vms").fetchall()
        keys = ("name", "datastore", "uuid", "state", "detail", "updated")
        return {row[0]: dict(zip(keys, row, strict=True)) for row in rows}

    # --- migrations ---------------------------------------------------------------------------------------

    def save_migration(self, record: MigrationRecord, role: str) -> None:
        """Insert or update a migration's record."""
        self.conn.execute(
            "INSERT INTO migrations VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "phase = excluded.phase, record = excluded.record",
            (
                record.id,
                record.vm,
                record.kind,
                role,
                record.phase.value,
                record.created,
                record.model_dump_json(),
            ),
        )

    def migration(self, migration_id: str) -> tuple[MigrationRecord, str]:
        """A record and this agent's role in it; ``KeyError`` if unknown."""
        row = self.conn.execute(
            "SELECT record, role FROM migrations WHERE id = ?", (migration_id,)
        ).fetchone()
        if row is None:
            raise KeyError(migration_id)
        try:
            return MigrationRecord.model_validate_json(row[0]), str(row[1])
        except ValidationError as exc:
            raise StateError(f"migration {migration_id}: damaged record: {exc}") from None

    def migrations(self, vm: str | None = None) -> list[tuple[MigrationRecord, str]]:
        """Every readable record (with the role), oldest first; of one VM if given."""
        sql = "SELECT id FROM migrations" + (" WHERE vm = ?" if vm else "") + " ORDER BY created"
        out = []
        for (migration_id,) in self.conn.execute(sql, (vm,) if vm else ()).fetchall():
            try:
                out.append(self.migration(migration_id))
            except (KeyError, StateError):
                continue
        return out

    # --- timelines ----------------------------------------------------------------------------------------

    def add_sample(self, migration_id: str, t: float, data: dict[str, Any]) -> None:
        """One point of a migration's timeline (``t``: seconds since it started)."""
        self.conn.execute("INSERT INTO samples VALUES (?, ?, ?)", (migration_id, t, json.dumps(data)))

    def samples(self, migration_id: str) -> list[tuple[float, dict[str, Any]]]:
        """A migration's timeline, in time order."""
        rows = self.conn.execute(
            "SELECT t, data FROM samples WHERE migration = ? ORDER BY t", (migration_id,)
        ).fetchall()
        return [(float(t), json.loads(data)) for t, data in rows]


class DbMigrationStore(MigrationStore):
    """The :class:`MigrationStore` the migration jobs write to, kept in the agent's database."""

    def __init__(self, db: AgentDb, role: str) -> None:
        super().__init__(db.path)
        self.db = db
        self.role = role

    def save(self, record: MigrationRecord) -> Path:
        self.db.save_migration(record, self.role)
        return self.db.path

    def load(self, migration_id: str) -> MigrationRecord:
        try:
            return self.db.migration(migration_id)[0]
        except StateError as exc:
            raise ValueError(str(exc)) from None

    def all(self) -> list[MigrationRecord]:
        return [record for record, _role in self.db.migrations()]
