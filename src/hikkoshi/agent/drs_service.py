"""The agent's DRS duties in a cluster, as two loops beside its registration:

- scheduled migrations: every ``drs_tick`` seconds, each due ``pending`` schedule whose VM this host
  owns is claimed (a transaction from ``pending`` to ``started``: only one agent ever wins it) and
  started here as an ordinary cluster migration; this agent then records how it ended;
- the automatic planner, when ``drs auto on``: the agent holding ``leader/drs`` (under its host lease,
  so it passes to another agent when this one goes) plans every ``interval`` seconds and hands each
  migration to the VM's owner as a schedule due now, which that host's agent runs as above. Agents
  never call each other's user routes (the token stays with people and scripts: issue 16), so the
  leader starts nothing on other hosts itself. Storage moves go the same way (a ``storage`` schedule:
  the owner runs ``storage-migrate``). Each run is recorded in etcd (``drs-runs/``: the imbalance it
  saw, its moves and the schedule each was handed to, its notes): ``hikkoshi drs history`` shows them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from hikkoshi.agent.client import AgentClient, AgentError
from hikkoshi.agent.drs_due import due_now
from hikkoshi.agent.drs_moves import Connect, request_of
from hikkoshi.agent.drs_read import ClusterState, read_state
from hikkoshi.cluster.drs_records import DrsRecords
from hikkoshi.cluster.errors import ClusterError
from hikkoshi.cluster.models import DrsRunRecord, RunMove, ScheduleRecord
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.drs.plan import Move, MoveKind
from hikkoshi.drs.planner import plan

if TYPE_CHECKING:
    from hikkoshi.agent.cluster_member import ClusterMember

log = logging.getLogger("hikkoshi.agent.drs")


class DrsService:
    """See the module's docstring."""

    def __init__(self, member: ClusterMember) -> None:
        self.member = member
        config = member.host.config
        self.name = config.name
        self.url = config.url
        # Only ever this agent's own API (its own token, its own certificate checked).
        self.connect: Connect = lambda url: AgentClient(url, config.token, ca_file=config.credentials.ca)
        self.tick = member.settings.drs_tick
        self.next_run = 0.0
        self.runs = 0

    def _records(self) -> DrsRecords | None:
        if not self.member.online or self.member.store is None:
            return None
        return DrsRecords(self.member.store, self.member.keys)

    # --- scheduled migrations ------------------------------------------------------------------------------

    async def schedules_once(self) -> None:
        records = self._records()
        if records is None:
            return
        rows = await records.schedules_at()
        due = set(due_now([r for r, _ in rows], time.time()))
        for rec, rev in rows:
            running = rec.state == "started" or (rec.state == "recurring" and rec.outcome == "started")
            if rec.id in due:
                await self._maybe_run(records, rec, rev)
            elif running and rec.runner == self.name and rec.migration:
                await self._check(records, rec, rev)

    async def _maybe_run(self, records: DrsRecords, rec: ScheduleRecord, rev: int) -> None:
        own = Ownership(records.store, records.keys)
        uuid = await own.uuid_of(rec.vm)
        if uuid is None:
            await records.update_schedule(
                rec, rev, **self._ended(rec, "failed"), error=f"no VM named {rec.vm!r}"
            )
            return
        owner = await own.owner(uuid)
        if owner is None or owner.host != self.name:
            return  # its owner runs it
        recurring = rec.window is not None
        if recurring and rec.kind == "migrate" and rec.to == self.name:  # there already: nothing to do
            await records.update_schedule(rec, rev, last_run=time.time(), outcome="done", error=None)
            return
        stamp = time.time()
        changes: dict[str, object] = {"runner": self.name, "last_run": stamp, "error": None}
        changes.update({"outcome": "started", "migration": None} if recurring else {"state": "started"})
        if await records.update_schedule(rec, rev, **changes) is None:
            # Another agent took it first, or etcd applied our claim and the store's retry of the
            # transaction found the revision moved: only our own stamp tells.
            found = await records.schedule(rec.id)
            if found is None or (found[0].runner, found[0].last_run) != (self.name, stamp):
                return
        log.info("scheduled migration %s: %s to %s", rec.id, rec.vm, rec.to)
        try:
            async with self.connect(self.url) as client:
                path, body = self._request(rec)
                accepted = await client.post(path, body)
        except AgentError as e:
            await self._settle(records, rec.id, **self._ended(rec, "failed"), error=e.detail)
            return
        await self._settle(records, rec.id, migration=accepted["id"])

    @staticmethod
    def _request(rec: ScheduleRecord) -> tuple[str, dict[str, object]]:
        """The agent's own typed route and body that start ``rec`` (never a path etcd names)."""
        if rec.kind == "storage":
            return f"/v1/vms/{rec.vm}/storage-migrate", {"datastore": rec.datastore}
        body: dict[str, object] = {"to": rec.to, "storage": rec.storage}
        if rec.datastore is not None:
            body["datastore"] = rec.datastore
        return f"/v1/vms/{rec.vm}/migrate", body

    @staticmethod
    def _ended(rec: ScheduleRecord, how: str) -> dict[str, object]:
        """The changes that end a run: a once schedule's state, a recurring one's last outcome."""
        return {"outcome": how} if rec.window is not None else {"state": how}

    async def _settle(self, records: DrsRecords, schedule_id: str, **changes: object) -> None:
        for _ in range(5):
            found = await records.schedule(schedule_id)
            if found is None or await records.update_schedule(found[0], found[1], **changes) is not None:
                return

    async def _check(self, records: DrsRecords, rec: ScheduleRecord, rev: int) -> None:
        try:
            async with self.connect(self.url) as client:
                info = await client.get(f"/v1/migrations/{rec.migration}")
        except AgentError as e:
            if e.status == 404:
                gone = self._ended(rec, "failed")
                await records.update_schedule(rec, rev, **gone, error="its migration is gone")
            return
        if info["running"]:
            return
        if info["phase"] == "done":
            await records.update_schedule(rec, rev, **self._ended(rec, "done"))
        else:
            error = str(info.get("error") or info["phase"])
            await records.update_schedule(rec, rev, **self._ended(rec, "failed"), error=error)

    # --- the automatic planner -----------------------------------------------------------------------------

    async def auto_once(self) -> None:
        records = self._records()
        reg = self.member.registration
        lease = reg.lease if reg is not None else None
        if records is None or lease is None or not lease.alive():
            return
        settings = await records.settings()
        if not settings.auto or not await records.lead(self.name, lease.id):
            return
        now = time.time()
        if now < self.next_run:
            return
        self.next_run = now + settings.interval
        state = await read_state(records.store, records.keys, max_moves=settings.max_moves)
        policy = state.policy(settings.level)
        p = plan(state.snapshot, policy)
        self.runs += 1
        if not p.moves:
            log.info("automatic DRS: no moves (imbalance %.3f); %s", p.imbalance_before, "; ".join(p.notes))
        # A VM whose earlier move is still waiting or running is not handed again (runs come every few
        # seconds; a migration takes longer).
        under_way = {r.vm: r.id for r in await records.schedules() if r.state in ("pending", "started")}
        handed: list[RunMove] = []
        for m in p.moves:
            log.info("automatic DRS: %s %s -> %s: %s", m.vm, m.source, m.target, m.reason)
            if m.vm in under_way:
                handed.append(
                    self._run_move(m, note=f"a move of it is under way (schedule {under_way[m.vm]})")
                )
                continue
            handed.append(await self._hand_over(records, state, m))
        balance = policy.balance
        run = DrsRunRecord(
            id=f"{int(now * 1000):013d}-{self.name}"[:64],
            at=now,
            leader=self.name,
            level=p.level,
            imbalance_before=p.imbalance_before,
            imbalance_after=p.imbalance_after,
            threshold=balance.tolerance if balance is not None else 0.0,
            moves=tuple(handed),
            notes=p.notes,
        )
        await records.add_run(run)

    @staticmethod
    def _run_move(m: Move, note: str | None = None) -> RunMove:
        return RunMove(
            vm=m.vm, source=m.source, target=m.target, kind=m.kind.value, why=m.why.value, reason=m.reason,
            note=note,
        )  # fmt: skip

    async def _hand_over(self, records: DrsRecords, state: ClusterState, m: Move) -> RunMove:
        """``m`` as a schedule due now, which the VM's owner runs; what became of it, for the run's record."""
        _path, body = request_of(state, m)
        datastore = body.get("datastore")
        name = str(datastore) if datastore is not None else None
        kind = "storage" if m.kind is MoveKind.STORAGE else "migrate"
        if m.kind is MoveKind.OFFLINE:
            return self._run_move(m, note="a powered-off VM moves only by maintenance")
        if m.kind is MoveKind.STORAGE and name is None:
            return self._run_move(m, note=f"{m.target} names no datastore {m.datastore}")
        storage = "shared" if m.kind is MoveKind.STORAGE else str(body["storage"])
        rec = await records.add_schedule(m.vm, m.target, time.time(), storage, kind=kind, datastore=name)
        log.info("automatic DRS: %s -> %s handed to its owner (schedule %s)", m.vm, m.target, rec.id)
        return self._run_move(m).model_copy(update={"schedule": rec.id})

    # --- loops ---------------------------------------------------------------------------------------------

    async def _loop(self, what: str, once: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await once()
            except (ClusterError, AgentError, OSError, ValueError) as e:
                log.warning("DRS %s: %s", what, e)
            except Exception:  # never the agent's end: its VMs and migrations go on
                log.exception("DRS %s failed", what)
            await asyncio.sleep(self.tick)

    async def run(self) -> None:
        """Both loops, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._loop("schedules", self.schedules_once))
            tg.create_task(self._loop("automatic planner", self.auto_once))
