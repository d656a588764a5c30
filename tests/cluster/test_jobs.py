"""Migration jobs: one coordinator under a lease, take-over after it lapsed, the commit point."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import CoordinatorAlive, JobExists, LeaseLost, NotCoordinator, OwnedElsewhere
from hikkoshi.cluster.jobs import Jobs
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.lease import KeptLease, kept_lease
from hikkoshi.cluster.models import JobRecord, VmRecord
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.cluster.store import Store
from hikkoshi.migrate.phases import Phase, PhaseError
from tests.support.etcd import run


async def unkept(store: Store, ttl: int) -> KeptLease:
    """A lease nobody renews: a coordinator that died."""
    asked = asyncio.get_running_loop().time()
    lease_id, granted = await store.grant(ttl)
    return KeptLease(store, lease_id, granted, asked)


async def wait_gone(store: Store, key: str, within: float) -> None:
    began = time.monotonic()
    while await store.get(key) is not None:
        assert time.monotonic() - began < within
        await asyncio.sleep(0.2)


def test_phases_and_take_over_before_commit(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            jobs = Jobs(store, keys)
            record = JobRecord(id="m1", vm=str(uuid.uuid4()), source="a", destination="b")
            dead = await unkept(store, 2)
            coord = await jobs.create(record, "a", dead)
            with pytest.raises(JobExists):
                await jobs.create(record, "c", dead)
            await jobs.advance(coord, Phase.PREPARE)
            await jobs.advance(coord, Phase.MEMORY)
            with pytest.raises(PhaseError):
                await jobs.advance(coord, Phase.PREPARE)  # never backwards
            view = await jobs.get("m1")  # visible from any agent
            assert view.record.phase is Phase.MEMORY and view.coordinator == "a" and not view.orphaned
            assert [p for p, _ in view.record.history] == [
                "precheck",
                "prepare-destination",
                "memory-precopy",
            ]
            async with kept_lease(store, 5) as mine:
                with pytest.raises(CoordinatorAlive) as err:
                    await jobs.take_over("m1", "c", mine)
                assert err.value.host == "a"
                await wait_gone(store, keys.coordinator("m1"), 6)  # a's lease lapsed for good
                (listed,) = await jobs.list()
                assert listed.orphaned and listed.recovery == "rollback"
                coord_c, view = await jobs.take_over("m1", "c", mine)
                assert view.recovery == "rollback"
                # The old coordinator is fenced: by its own clock first, by etcd in any case.
                with pytest.raises((NotCoordinator, LeaseLost)):
                    await jobs.advance(coord, Phase.SWITCHOVER)
                stale = type(coord)(coord.job_id, coord.host, mine, coord.revision)  # even with a live lease
                with pytest.raises(NotCoordinator):
                    await jobs.advance(stale, Phase.SWITCHOVER)
                await jobs.advance(coord_c, Phase.ROLLBACK)
                await jobs.advance(coord_c, Phase.ROLLED_BACK)
            view = await jobs.get("m1")
            assert view.record.phase is Phase.ROLLED_BACK and view.coordinator is None and not view.orphaned

    run(main())


def test_commit_moves_owner_with_the_phase(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            own, jobs = Ownership(store, keys), Jobs(store, keys)
            vm = VmRecord(uuid=str(uuid.uuid4()), name="moving", memory=1 << 30)
            source = await own.create_vm(vm, "a")
            async with kept_lease(store, 5) as lease:
                coord = await jobs.create(
                    JobRecord(id="m2", vm=vm.uuid, source="a", destination="b"), "a", lease
                )
                for phase in (Phase.PREPARE, Phase.MEMORY, Phase.SWITCHOVER):
                    await jobs.advance(coord, phase)
                with pytest.raises(ValueError):
                    await jobs.advance(coord, Phase.RESUME)
                dest = await jobs.commit(coord, source)
                assert dest.host == "b" and dest.token > source.token
                assert (await own.check_owner(vm.uuid, "b", dest.token)).ok
                assert not (await own.check_owner(vm.uuid, "a", source.token)).ok
                assert (await jobs.get("m2")).record.phase is Phase.RESUME
                with pytest.raises(PhaseError):
                    await jobs.advance(coord, Phase.ROLLBACK)  # past the commit point: only forward
                await jobs.advance(coord, Phase.DONE)
            # Committing with a stale owner token is refused, and records nothing.
            async with kept_lease(store, 5) as lease:
                coord = await jobs.create(
                    JobRecord(id="m3", vm=vm.uuid, source="b", destination="a"), "b", lease
                )
                await jobs.advance(coord, Phase.SWITCHOVER)
                with pytest.raises(OwnedElsewhere) as err:
                    await jobs.commit(coord, source)
                assert err.value.holder == "b"
                assert (await jobs.get("m3")).record.phase is Phase.SWITCHOVER

    run(main())


def test_an_offline_move_commits_as_it_enters_cleanup(config: EtcdConfig, keys: Keys) -> None:
    """A powered-off VM's move commits once the destination holds its disks: the record goes from
    storage-pre to cleanup in the transaction that moves the owner key (found by the maintenance test:
    a phase mirrored first made the commit look like a move backwards)."""

    async def main() -> None:
        async with Store(config) as store:
            own, jobs = Ownership(store, keys), Jobs(store, keys)
            vm = VmRecord(uuid=str(uuid.uuid4()), name="cold", memory=1 << 30)
            source = await own.create_vm(vm, "a")
            async with kept_lease(store, 5) as lease:
                coord = await jobs.create(
                    JobRecord(id="c1", vm=vm.uuid, source="a", destination="b"), "a", lease
                )
                await jobs.advance(coord, Phase.STORAGE_PRE)
                with pytest.raises(ValueError, match="committed phase"):
                    await jobs.commit(coord, source, Phase.SWITCHOVER)
                dest = await jobs.commit(coord, source, Phase.CLEANUP)
                assert dest.host == "b" and (await own.check_owner(vm.uuid, "b", dest.token)).ok
                got = (await jobs.get("c1")).record
                assert got.phase is Phase.CLEANUP and got.history[-1][0] == "cleanup"
                await jobs.advance(coord, Phase.DONE)

    run(main())


def test_take_over_after_commit_finishes(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            own, jobs = Ownership(store, keys), Jobs(store, keys)
            vm = VmRecord(uuid=str(uuid.uuid4()), name="half", memory=1 << 30)
            source = await own.create_vm(vm, "a")
            dead = await unkept(store, 2)
            coord = await jobs.create(JobRecord(id="m4", vm=vm.uuid, source="a", destination="b"), "a", dead)
            await jobs.commit(coord, source)
            await wait_gone(store, keys.coordinator("m4"), 6)
            async with kept_lease(store, 5) as lease:
                coord_b, view = await jobs.take_over("m4", "b", lease)
                assert view.recovery == "finish"
                await jobs.advance(coord_b, Phase.CLEANUP)
                await jobs.release(coord_b)
                assert (await jobs.get("m4")).orphaned

    run(main())
