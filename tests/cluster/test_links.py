"""Measured links and observed migrations in etcd (a real member): links stored by site pair in either
order, the newest wins; observations pruned to the most recent; unreadable records skipped rather than
failing the planner's read."""

from __future__ import annotations

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.links import Links
from hikkoshi.cluster.models import LinkRecord, ObservationRecord
from hikkoshi.cluster.observations import Observations
from hikkoshi.cluster.store import Store
from tests.support.etcd import run


def test_links_by_site_pair_newest_wins(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> list[LinkRecord]:
        async with Store(config) as store:
            links = Links(store, keys)
            assert await links.all() == []
            await links.record(LinkRecord(a="tokyo", b="osaka", bandwidth=1e6, rtt_ms=9.0, migration="m1"))
            await links.record(LinkRecord(a="osaka", b="tokyo", bandwidth=2e6, rtt_ms=8.0, migration="m2"))
            await links.record(LinkRecord(a="tokyo", b="tokyo", bandwidth=9e8, rtt_ms=0.1, migration="m3"))
            await store.put(keys.link("x", "y"), b"{not json")
            return await links.all()

    got = run(main())
    assert [(r.a, r.b, r.migration) for r in got] == [("osaka", "tokyo", "m2"), ("tokyo", "tokyo", "m3")]
    assert keys.link("tokyo", "osaka") == keys.link("osaka", "tokyo")


def test_observations_keep_the_most_recent(config: EtcdConfig, keys: Keys) -> None:
    """Only the figures the calibration reads are kept, oldest dropped beyond ``keep``."""
    report = {"elapsed_s": 4.2, "time_to_destination_s": 3.9, "migrate_info": {"downtime": 130, "ram": {}}}

    async def main() -> list[ObservationRecord]:
        async with Store(config) as store:
            seen = Observations(store, keys, keep=3)
            for i in range(5):
                await seen.add(f"m{i}", {"mode": "hybrid"}, {**report, "timeline": "big"})
            await store.put(keys.observation("junk"), b"[]")
            return await seen.recent()

    got = run(main())
    assert [o.migration for o in got] == ["m2", "m3", "m4"]  # m1 went when m4 came; junk is skipped
    assert got[0].report == {
        "elapsed_s": 4.2,
        "time_to_destination_s": 3.9,
        "migrate_info": {"downtime": 130},
    }
