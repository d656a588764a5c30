"""Limits in etcd: slots under leases, FIFO waiting, no_wait refusals (a real etcd)."""

from __future__ import annotations

import asyncio
import time

import pytest

from hikkoshi.cluster import slots as s
from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import LimitReached
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.lease import KeptLease, kept_lease
from hikkoshi.cluster.limits import Slots
from hikkoshi.cluster.models import Limits
from hikkoshi.cluster.store import Store
from tests.support.etcd import run


def test_limit_one_runs_one_at_a_time_in_order(config: EtcdConfig, keys: Keys) -> None:
    """Eight migrations out of host a, a limit of 1: one at a time, in the order they queued, all done."""
    running: list[str] = []
    order: list[str] = []
    most = 0

    async def migrate(job: str, queued: asyncio.Event) -> None:
        nonlocal most
        async with Store(config) as store, kept_lease(store, 5) as lease:
            slots = Slots(store, keys)
            waiting = slots.acquire(job, s.resources_for("a", "b"), lease, on_wait=lambda d: queued.set())
            task = asyncio.create_task(waiting)
            await asyncio.sleep(0.3)
            queued.set()
            grant = await task
            running.append(job)
            order.append(job)
            most = max(most, len(running))
            await asyncio.sleep(0.15)
            running.remove(job)
            await slots.release(grant)

    async def main() -> None:
        async with Store(config) as store:
            await Slots(store, keys).set_limits(Limits(host_out=1))
        async with asyncio.TaskGroup() as tg:
            for i in range(8):
                queued = asyncio.Event()
                tg.create_task(migrate(f"m{i}", queued))
                await queued.wait()  # the next one queues behind this one
        assert most == 1
        assert order == [f"m{i}" for i in range(8)]

    run(main())


def test_no_wait_refuses_with_reasons_and_queue_is_visible(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            slots = Slots(store, keys)
            await slots.set_limits(Limits(host_out=1, host_in=2))
            async with kept_lease(store, 5) as l1, kept_lease(store, 5) as l2:
                first = await slots.acquire("m1", s.resources_for("a", "b"), l1, no_wait=True)
                with pytest.raises(LimitReached) as err:
                    await slots.acquire("m2", s.resources_for("a", "c"), l2, no_wait=True)
                assert err.value.reasons == ("host-out:a: 1/1 slots held by m1",)
                seen: list[s.Decision] = []
                waiter = asyncio.create_task(
                    slots.acquire("m2", s.resources_for("a", "c"), l2, on_wait=seen.append)
                )
                began = time.monotonic()
                while not await slots.queue():
                    assert time.monotonic() - began < 5
                    await asyncio.sleep(0.05)
                (place,) = await slots.queue()
                assert place.position == 0 and place.entry.job == "m2"
                assert place.reasons == ("host-out:a: 1/1 slots held by m1",)
                # Another host is not held up by the queue on host a.
                async with kept_lease(store, 5) as l3:
                    await slots.acquire("m3", s.resources_for("b", "c"), l3, no_wait=True)
                assert not waiter.done()
                await slots.release(first)
                grant = await asyncio.wait_for(waiter, 5)
                assert grant.job == "m2" and seen and seen[0].position == 0
                assert await slots.queue() == []
                table, _ = await slots.table()
                assert table.held_by("m2") == set(grant.resources)

    run(main())


def test_dead_coordinator_frees_its_slots(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            slots = Slots(store, keys)
            await slots.set_limits(Limits(host_in=1))
            asked = asyncio.get_running_loop().time()
            lease_id, ttl = await store.grant(2)
            dead = KeptLease(store, lease_id, ttl, asked)  # nobody renews it
            await slots.acquire("m1", s.resources_for("a", "b"), dead, no_wait=True)
            async with kept_lease(store, 5) as lease:
                began = time.monotonic()
                grant = await asyncio.wait_for(slots.acquire("m2", s.resources_for("c", "b"), lease), 10)
                assert grant.job == "m2" and time.monotonic() - began < 6
            table, _ = await slots.table()
            assert not table.holders  # m2's lease was revoked on leaving: its slots went with it

    run(main())
