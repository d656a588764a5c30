"""The dashboard's ``--etcd`` source against a real etcd: hosts as the cluster lists them (a host whose
agent does not answer is ``unreachable``, one whose lease is gone ``down``), maintenance set and cleared
through the cluster's own keys, cluster migrations waiting for a slot shown ``queued``, and DRS said
to be not yet available."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.etcd_process import EtcdMember
from hikkoshi.cluster.host_view import HostState
from hikkoshi.cluster.hosts import list_hosts, register_host
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.models import DatastoreInfo, HostInfo, HostStatus, JobRecord, QueueEntry
from hikkoshi.cluster.store import Store
from hikkoshi.migrate.phases import Phase
from hikkoshi.web.etcd_source import EtcdSource, agent_url
from hikkoshi.web.source import SourceError
from tests.support.etcd import member_running, run


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    with member_running(tmp_path_factory.mktemp("etcd")) as member:
        yield member


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cluster_hosts_maintenance_and_queued_jobs(etcd: EtcdMember, tmp_path: Path) -> None:
    keys = Keys(f"/test-{uuid.uuid4().hex[:12]}")
    nobody = f"127.0.0.1:{_closed_port()}"  # an agent address where nothing answers

    def host(name: str) -> HostInfo:
        return HostInfo(
            name=name, api_address=nobody, memory_total=8 << 30,
            datastores=(DatastoreInfo(name="main", uuid=f"ds-{name}", capacity=100 << 30),),
        )  # fmt: skip

    async def main() -> None:
        async with Store(etcd_config(etcd)) as store:
            await store.put(keys.host("gone"), host("gone").to_bytes())  # registered once, lease long gone
            job = JobRecord(id="0a1b2c", vm="uuid-1", source="alpha", destination="gone")
            await store.put(keys.migration(job.id), job.to_bytes())
            await store.put(keys.queued(job.id), QueueEntry(job=job.id, resources=("cluster",)).to_bytes())
            status = lambda: HostStatus(memory_free=6 << 30)  # noqa: E731
            async with register_host(store, host("alpha"), status, keys=keys, ttl=5):
                source = EtcdSource(etcd.spec.endpoint, "token", keys=keys)
                try:
                    ov = await source.overview()
                    states = {h.name: h.state for h in ov.hosts}
                    assert states == {"alpha": "unreachable", "gone": "down"}
                    (alpha,) = [h for h in ov.hosts if h.name == "alpha"]
                    assert alpha.memory_total == 8 << 30 and alpha.datastores[0].name == "main"
                    (queued,) = ov.migrations
                    assert (queued.id, queued.state, queued.phase) == (
                        "0a1b2c",
                        "queued",
                        Phase.PRECHECK.value,
                    )
                    await source.set_maintenance("alpha", True, "new disks")
                    (view,) = [h for h in await list_hosts(store, keys) if h.info.name == "alpha"]
                    assert view.state is HostState.MAINTENANCE and view.maintenance is not None
                    assert view.maintenance.reason == "new disks"
                    shown = {h.name: h for h in (await source.overview()).hosts}
                    assert shown["alpha"].maintenance_reason == "new disks"
                    await source.set_maintenance("alpha", False)
                    (view,) = [h for h in await list_hosts(store, keys) if h.info.name == "alpha"]
                    assert view.state is HostState.UP
                    assert source.capabilities.maintenance and source.capabilities.drs
                    assert await source.recommendations() == []  # no VM runs: nothing to move
                    with pytest.raises(SourceError, match="no longer recommends"):
                        await source.apply("x~alpha")
                finally:
                    await source.aclose()

    run(main())
    assert agent_url("10.0.0.1:8710") == "https://10.0.0.1:8710"
    assert agent_url("https://a:8710") == "https://a:8710"


def etcd_config(member: EtcdMember) -> EtcdConfig:
    return EtcdConfig((member.spec.endpoint,), attempt_timeout=2.0, deadline=8.0)
