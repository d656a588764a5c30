"""The store against a real etcd: keys, prefixes, transactions, leases, watches, unavailability."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from hikkoshi.cluster import txn as t
from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import EtcdUnavailable, WatchCompacted
from hikkoshi.cluster.etcd_process import EtcdMember, free_ports
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.lease import LeaseState, kept_lease
from hikkoshi.cluster.store import EventKind, Store, WatchEvent
from tests.support.etcd import run, start_member


def test_keys_prefixes_and_pages(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            p = keys.root + "/many/"
            for i in range(0, 4500, 100):
                await store.txn([], [t.Put(f"{p}{j:05d}", b"x" * 10) for j in range(i, i + 100)])
            snap = await store.get_prefix(p)  # more than one page
            assert [kv.key for kv in snap.kvs] == [f"{p}{j:05d}" for j in range(4500)]
            assert len((await store.get_prefix(p, limit=2100)).kvs) == 2100
            assert await store.count_prefix(p) == 4500
            # A later write is not in a snapshot read at an earlier revision.
            await store.put(f"{p}zzz", b"late")
            again = await store.get_prefix(p, revision=snap.revision)
            assert len(again.kvs) == 4500
            assert await store.delete(p, prefix=True) == 4501
            assert await store.get(f"{p}00001") is None

    run(main())


def test_transactions_compare_revisions(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            k = keys.root + "/k"
            first = await store.txn([t.Compare.absent(k)], [t.Put(k, b"1")], [t.Get(k)])
            assert first.succeeded
            second = await store.txn([t.Compare.absent(k)], [t.Put(k, b"2")], [t.Get(k)])
            assert not second.succeeded
            (held,) = second.reads[0]
            assert held.value == b"1" and held.mod_revision == first.revision
            moved = await store.txn([t.Compare.modified_at(k, first.revision)], [t.Put(k, b"3")])
            assert moved.succeeded
            stale = await store.txn([t.Compare.modified_at(k, first.revision)], [t.Put(k, b"4")])
            assert not stale.succeeded
            assert (await store.get(k)).value == b"3"  # type: ignore[union-attr]
            # A prefix compare sees writes after a revision, anywhere under the prefix.
            rev = await store.revision()
            assert (await store.txn([t.Compare.unchanged_since(keys.root + "/", rev)], [])).succeeded
            await store.put(keys.root + "/other", b"x")
            assert not (await store.txn([t.Compare.unchanged_since(keys.root + "/", rev)], [])).succeeded

    run(main())


def test_lease_keepalive_and_expiry(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            k = keys.root + "/leased"
            async with kept_lease(store, 2) as lease:
                await store.put(k, b"v", lease=lease.id)
                await asyncio.sleep(4.5)  # more than twice the TTL: only the keep-alive holds it
                assert lease.alive() and lease.state is LeaseState.ALIVE
                assert await store.get(k) is not None
            assert await store.get(k) is None  # revoked on leaving
            # Not kept alive: it lapses by itself.
            lease_id, ttl = await store.grant(1)
            await store.put(k, b"v", lease=lease_id)
            await asyncio.sleep(ttl + 1.5)
            assert await store.get(k) is None
            assert await store.keepalive_once(lease_id) == 0
            await store.revoke(lease_id)  # already gone: fine

    run(main())


def test_watch_from_revision(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            p = keys.root + "/w/"
            await store.put(p + "before", b"0")
            rev = await store.revision()
            seen: list[WatchEvent] = []

            async def watch() -> None:
                async for ev in store.watch(p, start_revision=rev + 1):
                    seen.append(ev)
                    if len(seen) == 3:
                        return

            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(watch())
                await store.put(p + "a", b"1")  # may land before the watch is set up: still seen
                await store.put(p + "b", b"2")
                await store.delete(p + "a")
                await store.put(keys.root + "/outside", b"x")
                async with asyncio.timeout(5):
                    await task
            assert [(e.kind, e.kv.key) for e in seen] == [
                (EventKind.PUT, p + "a"),
                (EventKind.PUT, p + "b"),
                (EventKind.DELETE, p + "a"),
            ]
            assert [e.kv.mod_revision for e in seen] == sorted(e.kv.mod_revision for e in seen)

    run(main())


def test_watch_compacted(config: EtcdConfig, keys: Keys) -> None:
    async def main() -> None:
        async with Store(config) as store:
            k = keys.root + "/c"
            first = await store.put(k, b"1")
            await store.put(k, b"2")
            await store.compact(await store.revision())
            with pytest.raises(WatchCompacted):
                async with asyncio.timeout(5):
                    async for _ in store.watch(k, start_revision=first, prefix=False):
                        pass

    run(main())


def test_unreachable_at_start_is_one_clear_error() -> None:
    (port,) = free_ports(1)
    config = EtcdConfig((f"127.0.0.1:{port}",), attempt_timeout=0.5, deadline=1.5)

    async def main() -> None:
        began = time.monotonic()
        with pytest.raises(EtcdUnavailable) as err:
            async with Store(config):
                pass
        assert time.monotonic() - began < 3  # bounded
        assert f"127.0.0.1:{port}" in str(err.value)
        assert err.value.endpoints == (f"127.0.0.1:{port}",)

    run(main())


def test_lost_later_then_back(tmp_path: Path) -> None:
    """etcd dies under a connected store: bounded errors; it comes back: the same store works again."""
    member = start_member(tmp_path)
    config = EtcdConfig((member.spec.endpoint,), attempt_timeout=0.5, deadline=1.5)

    async def main() -> None:
        async with Store(config) as store:
            await store.put("/lost/k", b"1")
            async with kept_lease(store, 2) as lease:
                member.kill()
                began = time.monotonic()
                with pytest.raises(EtcdUnavailable):
                    await store.get("/lost/k")
                assert time.monotonic() - began < 3
                await asyncio.wait_for(lease.lost.wait(), 5)  # its TTL passed without a renewal
                assert not lease.alive()
                member.start()
                await member.wait_healthy()
                began = time.monotonic()
                while True:  # the channel reconnects by itself
                    try:
                        assert (await store.get("/lost/k")).value == b"1"  # type: ignore[union-attr]
                        break
                    except EtcdUnavailable:
                        assert time.monotonic() - began < 10
                assert time.monotonic() - began < 5

    try:
        run(main())
    finally:
        member.stop_sync()


def test_member_errors(tmp_path: Path, etcd: EtcdMember) -> None:
    from hikkoshi.cluster.errors import PortInUse
    from hikkoshi.cluster.etcd_process import MemberSpec

    (peer,) = free_ports(1)
    clash = EtcdMember(MemberSpec("clash", tmp_path / "clash", etcd.spec.client_port, peer))
    with pytest.raises(PortInUse, match=str(etcd.spec.client_port)):
        clash.start()
    assert clash.pid is None


def test_binary_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hikkoshi.cluster.errors import EtcdNotInstalled
    from hikkoshi.cluster.etcd_process import MemberSpec

    monkeypatch.setenv("PATH", str(tmp_path))
    client, peer = free_ports(2)
    member = EtcdMember(MemberSpec("x", tmp_path / "x", client, peer))
    try:
        with pytest.raises(EtcdNotInstalled, match="apt-get install etcd-server"):
            member.start()
    finally:
        member.stop_sync()
