"""A thin typed shell over etcd: keys, prefixes, transactions, leases, watches.

The only module that speaks to the etcd client library (etcd3aio over gRPC); everything above it sees
:class:`KeyValue`, :mod:`hikkoshi.cluster.txn` and :class:`EtcdUnavailable`.

Every call is bounded: one attempt waits at most ``attempt_timeout``; a call retries (another member,
a new leader, a reconnect) until ``deadline``, then raises :class:`EtcdUnavailable` naming the
endpoints. Writes are retried as they are: every write this package makes is either guarded by a
comparison (a replay after an unseen success fails the comparison, it is not applied twice) or puts
the same value again, and the callers recognise their own earlier success (a nonce in the value).

The gRPC channel reconnects by itself with a short backoff (at most ``_RECONNECT_MAX_MS``), and
balances over every endpoint (round robin over the members that are up), so a member that dies costs
the requests in flight on it one retry.

Reads are linearizable (etcd's default): a read sees every write that completed before it began.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
from etcd3aio import EtcdConnectionError, EtcdError, EtcdTransientError, prefix_range_end

# The request messages: etcd3aio builds them only through helpers that lack a mod-revision compare.
from etcd3aio._protobuf import Compare as PbCompare
from etcd3aio._protobuf import DeleteRangeRequest, PutRequest, RangeRequest, RequestOp
from etcd3aio.cluster import ClusterService
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.maintenance import MaintenanceService
from etcd3aio.watch import WatchService

from hikkoshi.cluster import txn as t
from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import ClusterError, EtcdUnavailable, WatchCompacted

T = TypeVar("T")
log = logging.getLogger(__name__)

_RECONNECT_MAX_MS = 1000
_PAGE = 2000
"""Keys per range request when reading a prefix (responses stay far below gRPC's message limit)."""

_TARGETS = {t.Target.CREATE: PbCompare.CREATE, t.Target.MOD: PbCompare.MOD, t.Target.VALUE: PbCompare.VALUE}
_OPS = {
    t.Op.EQUAL: PbCompare.EQUAL,
    t.Op.LESS: PbCompare.LESS,
    t.Op.GREATER: PbCompare.GREATER,
    t.Op.NOT_EQUAL: PbCompare.NOT_EQUAL,
}
_TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it. ``mod_revision`` is the revision of its last write."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class Snapshot:
    """The keys under a prefix, all read at one ``revision``."""

    kvs: tuple[KeyValue, ...]
    revision: int


@dataclass(frozen=True)
class Member:
    """A member of the etcd cluster, as the cluster lists it."""

    id: int
    name: str
    client_urls: tuple[str, ...]
    peer_urls: tuple[str, ...]
    learner: bool


@dataclass(frozen=True)
class MemberStatus:
    """What one member says of itself: its id, the leader it follows (0: none), its database."""

    id: int
    leader: int
    version: str
    db_size: int
    db_size_in_use: int
    raft_index: int
    raft_term: int
    errors: tuple[str, ...]


@dataclass(frozen=True)
class TxnResult:
    """Which branch ran, at which revision, and what its :class:`~hikkoshi.cluster.txn.Get`s read."""

    succeeded: bool
    revision: int
    reads: tuple[tuple[KeyValue, ...], ...]


class EventKind(enum.Enum):
    """What happened to a watched key."""

    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """A change seen by a watch (for a delete: an empty value, and the delete's revision as mod revision)."""

    kind: EventKind
    kv: KeyValue


def _kv(pb: object) -> KeyValue:
    return KeyValue(
        key=bytes(pb.key).decode(),  # type: ignore[attr-defined]
        value=bytes(pb.value),  # type: ignore[attr-defined]
        create_revision=int(pb.create_revision),  # type: ignore[attr-defined]
        mod_revision=int(pb.mod_revision),  # type: ignore[attr-defined]
        version=int(pb.version),  # type: ignore[attr-defined]
        lease=int(pb.lease),  # type: ignore[attr-defined]
    )


def _range_end(key: str, prefix: bool) -> bytes:
    return prefix_range_end(key.encode()) if prefix else b""


def _compare(c: t.Compare) -> object:
    pb = PbCompare(result=_OPS[c.op], target=_TARGETS[c.target], key=c.key.encode())
    if c.target is t.Target.CREATE:
        pb.create_revision = c.revision
    elif c.target is t.Target.MOD:
        pb.mod_revision = c.revision
    else:
        pb.value = c.value
    if c.prefix:
        pb.range_end = _range_end(c.key, True)
    return pb


def _request(a: t.Action) -> object:
    if isinstance(a, t.Put):
        return RequestOp(request_put=PutRequest(key=a.key.encode(), value=a.value, lease=a.lease))
    if isinstance(a, t.Delete):
        return RequestOp(
            request_delete_range=DeleteRangeRequest(key=a.key.encode(), range_end=_range_end(a.key, a.prefix))
        )
    return RequestOp(request_range=RangeRequest(key=a.key.encode(), range_end=_range_end(a.key, a.prefix)))


async def grpc_target(endpoints: Sequence[str]) -> str:
    """One gRPC target for all endpoints: a list of addresses, so the channel balances over them.

    gRPC takes several addresses only as literals of one family, so host names are resolved here.
    """
    loop = asyncio.get_running_loop()
    v4: list[str] = []
    v6: list[str] = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]")
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for a in dict.fromkeys(addresses):
            if a.version == 4:
                v4.append(f"{a}:{port}")
            else:
                v6.append(f"[{a}]:{port}")
    # One family only: IPv4 when there is any (loopback clusters and most sites).
    return f"ipv4:{','.join(v4)}" if v4 else f"ipv6:{','.join(v6)}"


class Store:
    """A connection to etcd. ``async with Store(config) as store:`` connects and checks etcd answers.

    Safe to share between tasks: requests are multiplexed on one channel.
    """

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._watch: WatchService | None = None
        self._maintenance: MaintenanceService | None = None
        self._cluster: ClusterService | None = None
        self.retries = 0
        """Attempts that failed and were retried (a figure for reports and tests)."""

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints this store talks to."""
        return self.config.endpoints

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self, *, check: bool = True) -> None:
        """Open the channel; with ``check``, read the current revision (:class:`EtcdUnavailable` if none)."""
        if self._channel is None:
            self._channel = await self._open_channel()
            self._kv = KVService(self._channel, max_attempts=1)
            self._lease = LeaseService(self._channel, max_attempts=1)
            self._watch = WatchService(self._channel, max_attempts=1)
            self._maintenance = MaintenanceService(self._channel, max_attempts=1)
            self._cluster = ClusterService(self._channel, max_attempts=1)
        if check:
            await self.revision()

    async def _open_channel(self) -> grpc.aio.Channel:
        try:
            target = await grpc_target(self.config.endpoints)
        except OSError as e:
            raise EtcdUnavailable(self.config.endpoints, "resolve", str(e)) from e
        options: list[tuple[str, str | int]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", _RECONNECT_MAX_MS),
            # Find a member that died without closing its connections (a cut cable), not only refusals.
            ("grpc.keepalive_time_ms", 5000),
            ("grpc.keepalive_timeout_ms", 3000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
        tls = self.config.tls
        if tls is None:
            return grpc.aio.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca_file.read_bytes(),
            private_key=tls.key_file.read_bytes() if tls.key_file else None,
            certificate_chain=tls.cert_file.read_bytes() if tls.cert_file else None,
        )
        server_name = tls.server_name or self.config.endpoints[0].rpartition(":")[0].strip("[]")
        options.append(("grpc.ssl_target_name_override", server_name))
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def close(self) -> None:
        """Close the channel (requests in flight are cancelled)."""
        channel, self._channel = self._channel, None
        self._kv = self._lease = self._watch = None
        self._maintenance = self._cluster = None
        if channel is not None:
            await channel.close()

    def _services(self) -> tuple[KVService, LeaseService, WatchService]:
        if self._kv is None or self._lease is None or self._watch is None:
            raise ClusterError("the store is not connected (use 'async with Store(...)')")
        return self._kv, self._lease, self._watch

    async def _call(self, operation: str, fn: Callable[[float], Awaitable[T]]) -> T:
        """``fn(timeout)`` until it answers or the deadline passes; the reason of the last failure is kept."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.config.deadline
        pause, most = self.config.retry_backoff
        while True:
            left = end - loop.time()
            timeout = max(0.05, min(self.config.attempt_timeout, left))
            try:
                async with asyncio.timeout(timeout):
                    return await fn(timeout)
            except TimeoutError:
                reason = f"no answer within {timeout:.2g} s"
            except (EtcdConnectionError, EtcdTransientError) as e:
                cause = e.__cause__
                reason = (
                    f"{cause.code().name}: {cause.details()}"
                    if isinstance(cause, grpc.aio.AioRpcError)
                    else str(e)
                )
            except grpc.aio.AioRpcError as e:
                if e.code() not in _TRANSIENT:
                    raise ClusterError(f"etcd refused {operation}: {e.code().name} {e.details()}") from e
                reason = f"{e.code().name} {e.details()}"
            except EtcdError as e:
                raise ClusterError(f"etcd refused {operation}: {e}") from e
            if loop.time() + pause >= end:
                raise EtcdUnavailable(self.config.endpoints, operation, _short(reason))
            self.retries += 1
            log.debug("etcd %s: %s; retrying in %.2f s", operation, reason, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, most)

    # -- keys ---------------------------------------------------------------------------------------

    async def revision(self) -> int:
        """The cluster's current revision (a linearizable read)."""
        kv, _, _ = self._services()
        resp = await self._call("revision", lambda to: kv.get(b"\0", timeout=to, count_only=True))
        return int(resp.header.revision)

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None."""
        kv, _, _ = self._services()
        resp = await self._call(f"get {key}", lambda to: kv.get(key.encode(), timeout=to))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(
        self, prefix: str, *, limit: int = 0, keys_only: bool = False, revision: int = 0
    ) -> Snapshot:
        """Every key under ``prefix`` (at most ``limit`` when not 0), in key order, at one revision.

        Read in pages; later pages are read at the first page's revision, so the whole is one snapshot
        (as long as etcd has not compacted that revision away meanwhile). ``revision``: read as of that
        revision (another read's, to see both at once), 0 for now.
        """
        start = prefix.encode()
        return await self._range(start, prefix_range_end(start), limit, keys_only, revision)

    async def get_range(self, first: str, last: str, *, revision: int = 0) -> Snapshot:
        """Every key from ``first`` to ``last`` (both included), in key order, at one revision."""
        return await self._range(first.encode(), last.encode() + b"\0", 0, False, revision)

    async def _range(self, start: bytes, end: bytes, limit: int, keys_only: bool, revision: int) -> Snapshot:
        kv, _, _ = self._services()
        out: list[KeyValue] = []
        while True:
            page = _PAGE if limit == 0 else min(_PAGE, limit - len(out))

            async def read(to: float, s: bytes = start, r: int = revision, n: int = page) -> Any:
                return await kv.get(s, end, revision=r, limit=n, keys_only=keys_only, timeout=to)

            resp = await self._call(f"range {start.decode(errors='replace')}", read)
            if revision == 0:
                revision = int(resp.header.revision)
            out.extend(_kv(x) for x in resp.kvs)
            if not resp.more or not resp.kvs or (limit and len(out) >= limit):
                return Snapshot(tuple(out), revision)
            start = bytes(resp.kvs[-1].key) + b"\0"

    async def count_prefix(self, prefix: str) -> int:
        """How many keys are under ``prefix``."""
        kv, _, _ = self._services()
        p = prefix.encode()
        resp = await self._call(
            f"count {prefix}", lambda to: kv.get(p, prefix_range_end(p), count_only=True, timeout=to)
        )
        return int(resp.count)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write the key; the revision of the write."""
        kv, _, _ = self._services()
        resp = await self._call(f"put {key}", lambda to: kv.put(key.encode(), value, lease=lease, timeout=to))
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete the key (or every key under it); how many were deleted."""
        kv, _, _ = self._services()
        end = _range_end(key, prefix) or None
        resp = await self._call(f"delete {key}", lambda to: kv.delete(key.encode(), end, timeout=to))
        return int(resp.deleted)

    async def txn(
        self, compare: Sequence[t.Compare], success: Sequence[t.Action], failure: Sequence[t.Action] = ()
    ) -> TxnResult:
        """Apply ``success`` if every comparison holds, else ``failure``, atomically at one revision.

        Retried as a whole on an uncertain failure: design the comparisons so a replay is harmless.
        """
        kv, _, _ = self._services()
        cmp = [_compare(c) for c in compare]
        ok = [_request(a) for a in success]
        ko = [_request(a) for a in failure]
        resp = await self._call("txn", lambda to: kv.txn(cmp, ok, ko, timeout=to))
        branch = success if resp.succeeded else failure
        reads = tuple(
            tuple(_kv(x) for x in r.response_range.kvs)
            for a, r in zip(branch, resp.responses, strict=True)
            if isinstance(a, t.Get)
        )
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), reads)

    async def compact(self, revision: int) -> None:
        """Drop the history before ``revision`` (watches from earlier get :class:`WatchCompacted`)."""
        kv, _, _ = self._services()
        await self._call("compact", lambda to: kv.compact(revision, physical=True, timeout=to))

    # -- leases -------------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: its id and the TTL etcd granted (seconds)."""
        _, lease, _ = self._services()
        resp = await self._call("lease grant", lambda to: lease.grant(ttl, timeout=to))
        return int(resp.ID), int(resp.TTL)

    async def keepalive_once(self, lease_id: int) -> int:
        """Renew the lease once; the TTL it has again, 0 when it is gone (expired or revoked)."""
        _, lease, _ = self._services()

        async def once(_: float) -> int:
            stream = lease.keep_alive(lease_id)
            try:
                async for resp in stream:
                    return int(resp.TTL)
                raise EtcdTransientError("keep-alive stream ended without an answer")
            finally:
                stream.cancel()

        return await self._call("lease keep-alive", once)

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds the lease has left; -1 when it is gone."""
        _, lease, _ = self._services()
        resp = await self._call("lease ttl", lambda to: lease.time_to_live(lease_id, timeout=to))
        return int(resp.TTL)

    async def revoke(self, lease_id: int) -> None:
        """End the lease now: every key attached to it is deleted. A lease already gone is fine."""
        _, lease, _ = self._services()

        async def revoke(to: float) -> None:
            try:
                await lease.revoke(lease_id, timeout=to)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        await self._call("lease revoke", revoke)

    # -- the cluster itself -------------------------------------------------------------------------

    async def members(self) -> list[Member]:
        """The cluster's members (a linearizable read: it needs a quorum)."""
        self._services()
        assert self._cluster is not None
        cluster = self._cluster
        resp = await self._call("member list", lambda to: cluster.member_list(timeout=to))
        return [
            Member(
                id=int(m.ID),
                name=str(m.name),
                client_urls=tuple(str(u) for u in m.clientURLs),
                peer_urls=tuple(str(u) for u in m.peerURLs),
                learner=bool(m.isLearner),
            )
            for m in resp.members
        ]

    async def member_status(self) -> MemberStatus:
        """The status of the member that answers (give the store one endpoint to ask a given member)."""
        self._services()
        assert self._maintenance is not None
        maintenance = self._maintenance
        r = await self._call("status", lambda to: maintenance.status(timeout=to))
        return MemberStatus(
            id=int(r.header.member_id),
            leader=int(r.leader),
            version=str(r.version),
            db_size=int(r.dbSize),
            db_size_in_use=int(r.dbSizeInUse),
            raft_index=int(r.raftIndex),
            raft_term=int(r.raftTerm),
            errors=tuple(str(e) for e in r.errors),
        )

    # -- watches ------------------------------------------------------------------------------------

    async def watch(self, key: str, *, start_revision: int, prefix: bool = True) -> AsyncIterator[WatchEvent]:
        """Every change to ``key`` (or under it) from ``start_revision`` on, in revision order.

        etcd delivers each event once, in order, with no gaps; across a lost connection the watch
        resumes after the last revision it delivered. If that history was compacted meanwhile,
        :class:`WatchCompacted`: read the state again and watch from its revision. The iterator
        never ends by itself (etcd unreachable: it waits); its owner cancels it.
        """
        _, _, watch = self._services()
        end = _range_end(key, prefix) or None
        try:
            async for resp in watch.watch(key.encode(), end, start_revision=start_revision):
                if resp.compact_revision:
                    raise WatchCompacted(int(resp.compact_revision))
                if resp.canceled:
                    raise ClusterError(f"etcd cancelled the watch on {key}: {resp.cancel_reason}")
                for ev in resp.events:
                    kind = EventKind.DELETE if ev.type == 1 else EventKind.PUT
                    yield WatchEvent(kind, _kv(ev.kv))
        except grpc.aio.AioRpcError as e:
            raise ClusterError(f"watch on {key} failed: {e.code().name} {e.details()}") from e


def _short(reason: str) -> str:
    return reason if len(reason) < 300 else reason[:297] + "..."
