"""Hosts: each agent registers under a lease it renews; anyone lists them as up, down or in maintenance.

A host has two keys: ``hosts/<name>`` (:class:`HostInfo`, no lease: it stays when the host goes
down, so a down host is still listed, as down) and ``live/<name>`` (:class:`HostStatus`, under the
host's lease: etcd deletes it when the host stops renewing). Up = the live key exists.

:func:`register_host` keeps the registration for as long as its block runs: it grants the lease,
writes both keys (the live one only if no other agent holds that name), renews the lease, publishes
fresh status figures every ``publish_every`` seconds, and when the lease was lost (the host was cut
off longer than the TTL) registers again under a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable

from hikkoshi.cluster import txn as t
from hikkoshi.cluster.errors import ClusterError, EtcdUnavailable, HostNameInUse
from hikkoshi.cluster.host_view import HostState, HostView
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.lease import KeptLease, LeaseState, kept_lease
from hikkoshi.cluster.models import HostInfo, HostStatus, Maintenance, now
from hikkoshi.cluster.store import Store
from hikkoshi.cluster.tasks import background

log = logging.getLogger(__name__)


class RegistrationState(enum.Enum):
    """Where this agent's registration stands."""

    REGISTERING = "registering"
    REGISTERED = "registered"
    CUT_OFF = "cut-off"
    """etcd does not answer; the lease may still live (the host is still listed up meanwhile)."""
    LAPSED = "lapsed"
    """The lease was lost: listed down until it is registered again (which it tries)."""


class Registration:
    """This host's registration; :func:`register_host` runs it."""

    def __init__(
        self,
        store: Store,
        keys: Keys,
        info: HostInfo,
        status: Callable[[], HostStatus],
        *,
        ttl: int,
        publish_every: float,
    ) -> None:
        self.store = store
        self.keys = keys
        self.info = info
        self.status = status
        self.ttl = ttl
        self.publish_every = publish_every
        self.agent = uuidlib.uuid4().hex
        self.state = RegistrationState.REGISTERING
        self.lease: KeptLease | None = None
        self.registered = asyncio.Event()

    def _status(self) -> HostStatus:
        return self.status().model_copy(update={"agent": self.agent, "updated_at": now()})

    async def _register(self, lease: KeptLease) -> None:
        """Write the record, and the live key unless another agent holds the name."""
        live = self.keys.live(self.info.name)
        await self.store.put(self.keys.host(self.info.name), self.info.to_bytes())
        r = await self.store.txn(
            [t.Compare.absent(live)],
            [t.Put(live, self._status().to_bytes(), lease=lease.id)],
            [t.Get(live)],
        )
        if not r.succeeded:
            held = HostStatus.from_bytes(r.reads[0][0].value) if r.reads[0] else None
            if held is None or held.agent != self.agent:  # not our own replayed write
                raise HostNameInUse(f"another agent is registered as host {self.info.name!r}")
        self.state = RegistrationState.REGISTERED
        self.registered.set()
        log.info("host %s registered (lease %x)", self.info.name, lease.id)

    async def publish(self) -> None:
        """Write fresh status figures now (under the current lease)."""
        lease = self.lease
        if lease is None or not lease.alive():
            return
        try:
            await self.store.put(self.keys.live(self.info.name), self._status().to_bytes(), lease=lease.id)
        except EtcdUnavailable:
            self.state = RegistrationState.CUT_OFF
        except ClusterError as e:  # the lease is gone: etcd refuses to attach to it
            log.warning("host %s: status not published: %s", self.info.name, e)
            lease.check()

    async def run(self, first: asyncio.Future[None]) -> None:
        """Register, stay registered, register again after a lapse. ``first``: the first attempt's outcome."""
        try:
            await self._run(first)
        except Exception as e:
            if first.done():
                raise
            first.set_exception(e)  # raised by register_host itself, not as a TaskGroup's group

    async def _run(self, first: asyncio.Future[None]) -> None:
        # A killed agent's live key outlives it by up to its lease's TTL: its successor waits that long.
        patience = asyncio.get_running_loop().time() + self.ttl + 2
        while True:
            try:
                await self._hold(first)
            except EtcdUnavailable:
                if not first.done():
                    raise
                # Cut off while registering again: keep trying (listed down meanwhile); the agent
                # and its VMs go on.
            except HostNameInUse as exc:
                if not first.done() and asyncio.get_running_loop().time() > patience:
                    raise
                log.warning("%s; trying again", exc)
            self.lease = None
            self.state = RegistrationState.LAPSED
            self.registered.clear()
            log.warning("host %s: lease lost; registering again", self.info.name)
            await asyncio.sleep(min(1.0, self.publish_every))

    async def _hold(self, first: asyncio.Future[None]) -> None:
        """One registration: under one lease, until the lease is lost."""
        async with kept_lease(self.store, self.ttl) as lease:
            self.lease = lease
            await self._register(lease)
            if not first.done():
                first.set_result(None)
            while lease.alive():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.publish_every):
                        await lease.lost.wait()
                if lease.state is LeaseState.UNCERTAIN:
                    self.state = RegistrationState.CUT_OFF
                    continue
                with contextlib.suppress(ClusterError):
                    await self.publish()


@contextlib.asynccontextmanager
async def register_host(
    store: Store,
    info: HostInfo,
    status: Callable[[], HostStatus],
    *,
    keys: Keys | None = None,
    ttl: int = 6,
    publish_every: float = 2.0,
) -> AsyncIterator[Registration]:
    """Keep ``info.name`` registered while the block runs; on exit the live key is revoked at once.

    ``status`` is called for the figures to publish (its ``agent`` field is filled in here). The
    first registration happens before the block starts: :class:`HostNameInUse` or
    :class:`EtcdUnavailable` are raised here.
    """
    reg = Registration(store, keys or Keys(), info, status, ttl=ttl, publish_every=publish_every)
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    async with background(reg.run(first), f"host-registration-{info.name}"):
        await first
        yield reg


async def list_hosts(store: Store, keys: Keys | None = None) -> list[HostView]:
    """Every host ever registered and not removed, with its state, read at one revision."""
    k = keys or Keys()
    infos = await store.get_prefix(k.hosts)
    lives = await store.get_prefix(k.live_hosts, revision=infos.revision)
    maints = await store.get_prefix(k.maintenances, revision=infos.revision)
    status = {Keys.last(kv.key): HostStatus.from_bytes(kv.value) for kv in lives.kvs}
    maint = {Keys.last(kv.key): Maintenance.from_bytes(kv.value) for kv in maints.kvs}
    out = []
    for kv in infos.kvs:
        name = Keys.last(kv.key)
        st, m = status.get(name), maint.get(name)
        state = HostState.DOWN if st is None else HostState.MAINTENANCE if m else HostState.UP
        out.append(HostView(HostInfo.from_bytes(kv.value), st, m, state))
    return out


async def set_maintenance(store: Store, name: str, reason: str, keys: Keys | None = None) -> None:
    """Put the host in maintenance (nothing is placed on it)."""
    await store.put((keys or Keys()).maintenance(name), Maintenance(reason=reason).to_bytes())


async def clear_maintenance(store: Store, name: str, keys: Keys | None = None) -> None:
    """Take the host out of maintenance."""
    await store.delete((keys or Keys()).maintenance(name))


async def remove_host(store: Store, name: str, keys: Keys | None = None) -> bool:
    """Forget a host that is down (its record and maintenance mark); False if it is up."""
    k = keys or Keys()
    r = await store.txn(
        [t.Compare.absent(k.live(name))], [t.Delete(k.host(name)), t.Delete(k.maintenance(name))]
    )
    return r.succeeded
