"""One owner per VM: concurrent claims, fencing tokens, unique names (a real etcd)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import NameTaken, OwnedElsewhere
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.models import VmRecord
from hikkoshi.cluster.ownership import Claim, Ownership, OwnerState
from hikkoshi.cluster.store import Store
from tests.support.etcd import run


def vm(name: str) -> VmRecord:
    return VmRecord(uuid=str(uuid.uuid4()), name=name, memory=256 << 20)


def test_twenty_concurrent_creations_one_wins(config: EtcdConfig, keys: Keys) -> None:
    """20 hosts register the same VM at once, each on its own connection: exactly one owns it."""
    record = vm("web")

    async def one(host: str) -> Claim | OwnedElsewhere:
        async with Store(config) as store:
            try:
                return await Ownership(store, keys).create_vm(record, host)
            except OwnedElsewhere as e:
                return e

    async def main() -> None:
        results = await asyncio.gather(*(one(f"h{i}") for i in range(20)))
        wins = [r for r in results if isinstance(r, Claim)]
        losses = [r for r in results if isinstance(r, OwnedElsewhere)]
        assert len(wins) == 1 and len(losses) == 19
        (win,) = wins
        assert {e.holder for e in losses} == {win.host}  # every loser is told who holds it
        assert {e.token for e in losses} == {win.token}
        async with Store(config) as store:
            own = Ownership(store, keys)
            assert await own.owner(record.uuid) == win
            assert (await own.check_owner(record.uuid, win.host, win.token)).ok

    run(main())


def test_twenty_concurrent_claims_one_wins(config: EtcdConfig, keys: Keys) -> None:
    """A registered VM without an owner (its owner key removed): 20 claims, one winner."""
    record = vm("db")

    async def main() -> None:
        async with Store(config) as store:
            own = Ownership(store, keys)
            first = await own.create_vm(record, "h0")
            await store.delete(keys.owner(record.uuid))
            results = await asyncio.gather(
                *(own.claim(record.uuid, f"h{i}") for i in range(20)), return_exceptions=True
            )
            wins = [r for r in results if isinstance(r, Claim)]
            assert len(wins) == 1
            assert all(
                isinstance(r, OwnedElsewhere) and r.holder == wins[0].host for r in results if r not in wins
            )
            assert wins[0].token > first.token

    run(main())


def test_fencing_stale_token_refused(config: EtcdConfig, keys: Keys) -> None:
    record = vm("api")

    async def main() -> None:
        async with Store(config) as store:
            own = Ownership(store, keys)
            a = await own.create_vm(record, "a")
            b = await own.move(a, "b")
            assert b.host == "b" and b.token > a.token
            # The old owner's token is stale: it may not resume, nor move the VM anywhere.
            check = await own.check_owner(record.uuid, "a", a.token)
            assert check.state is OwnerState.MOVED and check.holder == "b" and check.token == b.token
            with pytest.raises(OwnedElsewhere) as err:
                await own.move(a, "c")
            assert err.value.holder == "b" and err.value.token == b.token
            with pytest.raises(OwnedElsewhere):
                await own.require_owner(record.uuid, "a", a.token)
            # Right host, stale token (it moved away and back): refused too.
            back = await own.move(b, "a")
            assert not (await own.check_owner(record.uuid, "a", a.token)).ok
            assert (await own.check_owner(record.uuid, "a", back.token)).ok
            # Two movers holding the same token: one wins.
            results = await asyncio.gather(own.move(back, "x"), own.move(back, "y"), return_exceptions=True)
            assert sum(isinstance(r, Claim) for r in results) == 1
            gone = Claim(record.uuid, "a", back.token)
            with pytest.raises(OwnedElsewhere):
                await own.remove_vm(gone)
            now = await own.owner(record.uuid)
            assert now is not None
            await own.remove_vm(now)
            assert (await own.check_owner(record.uuid, now.host, now.token)).state is OwnerState.NO_OWNER
            assert await own.uuid_of("api") is None

    run(main())


def test_names_unique(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            own = Ownership(store, keys)
            first = vm("same")
            await own.create_vm(first, "a")
            with pytest.raises(NameTaken) as err:
                await own.create_vm(vm("same"), "b")
            assert err.value.uuid == first.uuid
            assert await own.uuid_of("same") == first.uuid
            # Many at once under one new name: one VM gets it.
            results = await asyncio.gather(
                *(own.create_vm(vm("race"), f"h{i}") for i in range(10)), return_exceptions=True
            )
            assert sum(isinstance(r, Claim) for r in results) == 1
            assert all(isinstance(r, NameTaken) for r in results if not isinstance(r, Claim))
            views = await own.list_vms()
            assert sorted(v.vm.name for v in views) == ["race", "same"]
            assert all(v.owner is not None and v.token > 0 for v in views)

    run(main())


def test_replayed_create_recognised(config: EtcdConfig, keys: Keys) -> None:
    """A write whose answer was lost is replayed; the nonce tells the writer it had won."""
    from hikkoshi.cluster.store import TxnResult

    async def main() -> None:
        async with Store(config) as store:
            real = store.txn
            calls = 0

            async def twice(*a: object, **kw: object) -> TxnResult:
                nonlocal calls
                calls += 1
                await real(*a, **kw)  # type: ignore[arg-type]
                return await real(*a, **kw)  # type: ignore[arg-type]  # the replay is what we hear

            store.txn = twice  # type: ignore[method-assign]
            own = Ownership(store, keys)
            record = vm("replayed")
            claim = await own.create_vm(record, "a")
            moved = await own.move(claim, "b")
            store.txn = real  # type: ignore[method-assign]
            assert calls == 2
            assert await own.owner(record.uuid) == moved

    run(main())
