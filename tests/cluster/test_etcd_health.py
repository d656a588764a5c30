"""``cluster status``'s figures: members, leader, health, database size and key counts, from real etcd."""

from __future__ import annotations

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.etcd_health import cluster_health
from hikkoshi.cluster.etcd_process import LocalCluster
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.models import HostInfo, VmRecord
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.cluster.store import Store
from tests.support.etcd import run


def test_health_of_three_members_and_of_two(cluster3: LocalCluster) -> None:
    keys = Keys("/health")

    async def main() -> None:
        config = EtcdConfig(tuple(cluster3.endpoints), attempt_timeout=1.0, deadline=10.0)
        async with Store(config) as store:
            await store.put(
                keys.host("a"), HostInfo(name="a", api_address="http://a", memory_total=1).to_bytes()
            )
            await Ownership(store, keys).create_vm(VmRecord(uuid="u1", name="v1", memory=1), "a")
            health = await cluster_health(store, keys)
            assert health.healthy and len(health.members) == 3
            assert all(m.healthy and m.status is not None and m.status.db_size > 0 for m in health.members)
            leader = await cluster3.leader()
            assert health.leader == cluster3.members[leader].spec.name
            assert [m.leads for m in health.members].count(True) == 1
            assert health.counts == {"hosts": 1, "hosts-up": 0, "vms": 1, "migrations": 0, "queued": 0}
            # A follower dies: it shows as such, and the cluster (two of three) is still healthy.
            follower = next(i for i in range(3) if i != leader)
            cluster3.members[follower].kill()
            health = await cluster_health(store, keys)
            dead = next(m for m in health.members if m.member.name == cluster3.members[follower].spec.name)
            assert not dead.healthy and dead.status is None and dead.problem
            assert health.healthy and sum(m.healthy for m in health.members) == 2

    run(main())
