"""Hosts under leases: registered up, down when the lease lapses, maintenance (a real etcd)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import HostNameInUse
from hikkoshi.cluster.host_view import HostState
from hikkoshi.cluster.hosts import (
    RegistrationState,
    clear_maintenance,
    list_hosts,
    register_host,
    remove_host,
    set_maintenance,
)
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.models import DatastoreInfo, HostInfo, HostLoad, HostStatus
from hikkoshi.cluster.store import Store
from tests.support.etcd import gone, run


def info(name: str) -> HostInfo:
    return HostInfo(
        name=name,
        api_address=f"http://{name}:8710",
        migration_addresses=(f"{name}-mig",),
        cpu_model="qemu64",
        memory_total=8 << 30,
        datastores=(DatastoreInfo(name="main", uuid=f"ds-{name}", capacity=100 << 30),),
    )


def test_registered_then_down_when_agent_dies(config: EtcdConfig, keys: Keys) -> None:
    """An agent process registers, is killed (no revoke): its host is listed down once the TTL passed."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from hikkoshi.cluster.config import EtcdConfig
        from hikkoshi.cluster.hosts import register_host
        from hikkoshi.cluster.keys import Keys
        from hikkoshi.cluster.models import HostInfo, HostStatus

        async def main():
            info = HostInfo(name="doomed", api_address="http://doomed:8710", memory_total=1 << 30)
            async with Store(EtcdConfig({config.endpoints!r})) as store:
                async with register_host(store, info, lambda: HostStatus(memory_free=1 << 29),
                                         keys=Keys({keys.root!r}), ttl=2, publish_every=0.5):
                    print("registered", flush=True)
                    await asyncio.sleep(60)

        from hikkoshi.cluster.store import Store
        asyncio.run(main())
        """
    )
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        assert agent.stdout.readline().strip() == "registered"

        async def main() -> None:
            async with Store(config) as store:
                (view,) = await list_hosts(store, keys)
                assert view.state is HostState.UP and view.status is not None
                assert view.status.memory_free == 1 << 29
                os.kill(agent.pid, signal.SIGKILL)
                agent.wait()
                killed = time.monotonic()
                while (await list_hosts(store, keys))[0].state is HostState.UP:
                    assert time.monotonic() - killed < 6, "still up long after its TTL"
                    await asyncio.sleep(0.2)
                (view,) = await list_hosts(store, keys)
                assert view.state is HostState.DOWN and view.status is None
                assert view.info.name == "doomed"  # still listed, as down
                assert await remove_host(store, "doomed", keys)
                assert await list_hosts(store, keys) == []

        run(main())
    finally:
        agent.kill()
        agent.wait()
        assert gone(agent.pid)


def test_registration_publishes_and_recovers(config: EtcdConfig, keys: Keys) -> None:
    figures = {"vms": 0}

    def status() -> HostStatus:
        return HostStatus(memory_free=4 << 30, load=HostLoad(cpu=0.25, vms=figures["vms"]))

    async def main() -> None:
        async with Store(config) as store:
            async with register_host(store, info("a"), status, keys=keys, ttl=2, publish_every=0.3) as reg:
                assert reg.state is RegistrationState.REGISTERED
                # A second agent under the same name is refused.
                with pytest.raises(HostNameInUse):
                    async with register_host(store, info("a"), status, keys=keys, ttl=2):
                        pass
                figures["vms"] = 3
                await asyncio.sleep(1.0)
                (view,) = await list_hosts(store, keys)
                assert view.status is not None and view.status.load.vms == 3
                # The lease is revoked behind its back (as when it lapsed): it registers again.
                assert reg.lease is not None
                old = reg.lease.id
                await store.revoke(old)
                began = time.monotonic()
                while (
                    reg.lease is None or reg.lease.id == old or reg.state is not RegistrationState.REGISTERED
                ):
                    assert time.monotonic() - began < 8
                    await asyncio.sleep(0.1)
                assert (await list_hosts(store, keys))[0].state is HostState.UP
                await set_maintenance(store, "a", "disk swap", keys)
                (view,) = await list_hosts(store, keys)
                assert view.state is HostState.MAINTENANCE and view.maintenance is not None
                assert view.maintenance.reason == "disk swap"
                assert not await remove_host(store, "a", keys)  # up: not removed
                await clear_maintenance(store, "a", keys)
                assert (await list_hosts(store, keys))[0].state is HostState.UP
            # Leaving revokes at once: down without waiting for the TTL.
            assert (await list_hosts(store, keys))[0].state is HostState.DOWN

    run(main())


def test_registration_with_etcd_unreachable_is_one_clear_error(keys: Keys) -> None:
    from hikkoshi.cluster.errors import EtcdUnavailable
    from hikkoshi.cluster.etcd_process import free_ports

    (port,) = free_ports(1)
    config = EtcdConfig((f"127.0.0.1:{port}",), attempt_timeout=0.3, deadline=1.0)

    async def main() -> None:
        store = Store(config)
        await store.connect(check=False)
        try:
            with pytest.raises(EtcdUnavailable, match=f"127.0.0.1:{port}"):
                async with register_host(store, info("x"), lambda: HostStatus(memory_free=0), keys=keys):
                    pass
        finally:
            await store.close()

    run(main())
