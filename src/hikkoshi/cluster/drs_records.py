"""DRS's records in etcd: placement rules, scheduled migrations, the automatic planner's settings, its
leader and what its runs did. Reads and writes only; what they mean is the planner's (:mod:`hikkoshi.drs`).

A scheduled migration runs once even with several agents up: an agent starts it only after a
transaction moved it from ``pending`` to ``started`` at the revision it read (whoever loses the race
sees the revision changed and leaves it). The automatic planner runs in one agent at a time: the one
whose key ``leader/drs`` (under its own lease) was created first.
"""

from __future__ import annotations

import time
import uuid as uuidlib

from hikkoshi.cluster import txn as t
from hikkoshi.cluster.keys import Keys, segment
from hikkoshi.cluster.models import DrsRunRecord, DrsSettings, RuleRecord, ScheduleRecord
from hikkoshi.cluster.recent import put_recent, read_recent
from hikkoshi.cluster.store import Store

FINAL = frozenset({"done", "failed", "cancelled"})
"""Schedule states that never change again."""
KEEP_RUNS = 50
"""Automatic planner runs kept (the oldest dropped): at the default interval, about four hours."""


class DrsRecords:
    """Rules, schedules and settings under one key root."""

    def __init__(self, store: Store, keys: Keys | None = None) -> None:
        self.store = store
        self.keys = keys or Keys()

    # --- rules ---------------------------------------------------------------------------------------------

    async def add_rule(self, rule: RuleRecord) -> bool:
        """Store a new rule; False if one of that name exists."""
        key = self.keys.rule(segment(rule.name, "rule name"))
        r = await self.store.txn([t.Compare.absent(key)], [t.Put(key, rule.to_bytes())])
        return r.succeeded

    async def rules(self) -> list[RuleRecord]:
        got = await self.store.get_prefix(self.keys.rules)
        return sorted((RuleRecord.from_bytes(kv.value) for kv in got.kvs), key=lambda r: r.name)

    async def delete_rule(self, name: str) -> bool:
        return await self.store.delete(self.keys.rule(name)) > 0

    # --- schedules -----------------------------------------------------------------------------------------

    async def add_schedule(
        self,
        vm: str,
        to: str,
        at: float,
        storage: str = "hybrid",
        *,
        window: str | None = None,
        days: tuple[int, ...] = (),
        tz: str = "UTC",
        kind: str = "migrate",
        datastore: str | None = None,
    ) -> ScheduleRecord:
        """``kind`` ``migrate``: the VM goes to host ``to`` (disks to ``datastore`` there, if named);
        ``storage``: its disks go to ``datastore`` of its host ``to``."""
        if kind not in ("migrate", "storage"):
            raise ValueError(f"a schedule migrates a VM or its storage, not {kind!r}")
        if kind == "storage" and not datastore:
            raise ValueError("a storage schedule names the datastore its disks go to")
        state = "recurring" if window else "pending"
        rec = ScheduleRecord(
            id=uuidlib.uuid4().hex[:12],
            vm=vm,
            to=to,
            at=at,
            storage=storage,
            window=window,
            days=days,
            tz=tz,
            state=state,
            kind=kind,
            datastore=datastore,
        )
        await self.store.put(self.keys.schedule(rec.id), rec.to_bytes())
        return rec

    async def schedules_at(self) -> list[tuple[ScheduleRecord, int]]:
        """Every schedule with its key's mod revision, soonest first."""
        got = await self.store.get_prefix(self.keys.schedules)
        rows = [(ScheduleRecord.from_bytes(kv.value), kv.mod_revision) for kv in got.kvs]
        return sorted(rows, key=lambda r: (r[0].at, r[0].id))

    async def schedules(self) -> list[ScheduleRecord]:
        return [s for s, _ in await self.schedules_at()]

    async def schedule(self, schedule_id: str) -> tuple[ScheduleRecord, int] | None:
        kv = await self.store.get(self.keys.schedule(schedule_id))
        return None if kv is None else (ScheduleRecord.from_bytes(kv.value), kv.mod_revision)

    async def update_schedule(
        self, rec: ScheduleRecord, revision: int, **changes: object
    ) -> ScheduleRecord | None:
        """``rec`` changed so if nobody wrote it since ``revision``; None if somebody did."""
        new = rec.model_copy(update={**changes, "updated_at": time.time()})
        key = self.keys.schedule(rec.id)
        r = await self.store.txn([t.Compare.modified_at(key, revision)], [t.Put(key, new.to_bytes())])
        return new if r.succeeded else None

    async def cancel_schedule(self, schedule_id: str) -> ScheduleRecord | str:
        """The cancelled schedule, or why it cannot be (unknown, started or over already)."""
        for _ in range(5):
            found = await self.schedule(schedule_id)
            if found is None:
                return f"no schedule {schedule_id!r}"
            rec, rev = found
            if rec.state not in ("pending", "recurring"):
                return f"schedule {schedule_id} is {rec.state} already"
            done = await self.update_schedule(rec, rev, state="cancelled")
            if done is not None:
                return done
        return f"schedule {schedule_id} keeps changing; try again"

    # --- the automatic planner's runs ----------------------------------------------------------------------

    async def add_run(self, run: DrsRunRecord) -> None:
        """Keep ``run``; drop the oldest beyond :data:`KEEP_RUNS`."""
        await put_recent(self.store, self.keys.drs_runs, self.keys.drs_run(run.id), run, KEEP_RUNS)

    async def runs(self) -> list[DrsRunRecord]:
        """The kept runs, oldest first (unreadable ones skipped)."""
        return await read_recent(self.store, self.keys.drs_runs, DrsRunRecord)

    # --- settings and leader -------------------------------------------------------------------------------

    async def settings(self) -> DrsSettings:
        kv = await self.store.get(self.keys.drs)
        return DrsSettings() if kv is None else DrsSettings.from_bytes(kv.value)

    async def set_settings(self, settings: DrsSettings) -> None:
        await self.store.put(self.keys.drs, settings.to_bytes())

    async def lead(self, host: str, lease: int) -> bool:
        """Whether ``host`` leads the automatic planner (becoming the leader if there is none)."""
        key = self.keys.drs_leader
        r = await self.store.txn(
            [t.Compare.absent(key)], [t.Put(key, host.encode(), lease=lease)], [t.Get(key)]
        )
        if r.succeeded:
            return True
        return bool(r.reads[0]) and r.reads[0][0].value == host.encode()

    async def leader(self) -> str | None:
        kv = await self.store.get(self.keys.drs_leader)
        return None if kv is None else kv.value.decode()
