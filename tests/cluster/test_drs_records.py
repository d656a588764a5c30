"""DRS's records in etcd (a real member): the automatic planner's runs kept to the most recent, unreadable
ones skipped; schedules that move a VM's storage name their datastore."""

from __future__ import annotations

import pytest

from hikkoshi.cluster import drs_records
from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.drs_records import DrsRecords
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.models import DrsRunRecord, RunMove, ScheduleRecord
from hikkoshi.cluster.store import Store
from tests.support.etcd import run


def _run(i: int) -> DrsRunRecord:
    move = RunMove(
        vm=f"v{i}", source="a", target="b", kind="migrate", why="balance", reason="r", schedule="s"
    )
    return DrsRunRecord(
        id=f"{i:04d}-a", leader="a", level=3, imbalance_before=0.3, imbalance_after=0.1, threshold=0.08,
        moves=(move,),
    )  # fmt: skip


def test_runs_keep_the_most_recent(config: EtcdConfig, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drs_records, "KEEP_RUNS", 3)

    async def main() -> list[DrsRunRecord]:
        async with Store(config) as store:
            records = DrsRecords(store, keys)
            assert await records.runs() == []
            for i in range(5):
                await records.add_run(_run(i))
            await store.put(keys.drs_run("junk"), b"{}")
            return await records.runs()

    got = run(main())
    assert [r.id for r in got] == ["0002-a", "0003-a", "0004-a"]  # junk skipped, the oldest dropped
    assert got[0].moves[0].vm == "v2" and got[0].moves[0].schedule == "s"


def test_storage_schedules_name_their_datastore(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> list[ScheduleRecord]:
        async with Store(config) as store:
            records = DrsRecords(store, keys)
            with pytest.raises(ValueError, match="names the datastore"):
                await records.add_schedule("v", "a", 0.0, kind="storage")
            with pytest.raises(ValueError, match="not 'exec'"):
                await records.add_schedule("v", "a", 0.0, kind="exec", datastore="fast")
            await records.add_schedule("v", "a", 0.0, "shared", kind="storage", datastore="fast")
            await records.add_schedule("w", "b", 1.0, "hybrid", datastore="big")
            return await records.schedules()

    first, second = run(main())
    assert (first.kind, first.to, first.datastore) == ("storage", "a", "fast")
    assert (second.kind, second.datastore) == ("migrate", "big")
