"""Completed migrations kept for the prediction's calibration (``observations/<id>``): the most recent
``KEEP``, oldest dropped as new ones come (:mod:`hikkoshi.migrate.observation` says what they are for)."""

from __future__ import annotations

from typing import Any

from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.models import ObservationRecord
from hikkoshi.cluster.recent import put_recent, read_recent
from hikkoshi.cluster.store import Store

#: Observations kept in etcd (a calibration reads far fewer; the rest are for a person to look at).
KEEP = 100
#: The figures of a report the calibration reads (the rest of a report stays with its migration).
REPORT_FIGURES = ("elapsed_s", "time_to_destination_s", "memory_started", "phases_s")


class Observations:
    """Observations under one key root."""

    def __init__(self, store: Store, keys: Keys | None = None, keep: int = KEEP) -> None:
        self.store = store
        self.keys = keys or Keys()
        self.keep = keep

    async def add(self, migration: str, inputs: dict[str, Any], report: dict[str, Any]) -> ObservationRecord:
        """Keep what ``migration`` measured; drop the oldest beyond :attr:`keep`."""
        figures = {k: report[k] for k in REPORT_FIGURES if k in report}
        downtime = (report.get("migrate_info") or {}).get("downtime")
        if downtime is not None:
            figures["migrate_info"] = {"downtime": downtime}
        record = ObservationRecord(migration=migration, inputs=inputs, report=figures)
        await put_recent(
            self.store, self.keys.observations, self.keys.observation(migration), record, self.keep
        )
        return record

    async def recent(self) -> list[ObservationRecord]:
        """Every kept observation, oldest first (unreadable ones skipped)."""
        return await read_recent(self.store, self.keys.observations, ObservationRecord)
