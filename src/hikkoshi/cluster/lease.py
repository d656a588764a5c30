"""A lease kept alive by a task its owner's TaskGroup holds, and what it knows about its own life.

etcd deletes every key attached to a lease when the lease is not renewed within its TTL. A holder
cut off from etcd cannot know exactly when that happens; what it can know, by its own clock, is a
time before which the lease surely still lives: the TTL counted from when it *sent* its last renewal
that was answered. :meth:`KeptLease.alive` is that; past it the holder must act as if the lease were
gone (a coordinator stops coordinating). Nothing else can be concluded: the keys may live a little
longer (a new etcd leader extends every lease once).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator

from hikkoshi.cluster.errors import ClusterError, EtcdUnavailable, LeaseLost
from hikkoshi.cluster.store import Store
from hikkoshi.cluster.tasks import background

log = logging.getLogger(__name__)


class LeaseState(enum.Enum):
    """What the keeper knows of its lease."""

    ALIVE = "alive"
    """Renewed within its TTL."""
    UNCERTAIN = "uncertain"
    """etcd does not answer; the lease surely lives until :attr:`KeptLease.alive_until`."""
    LOST = "lost"
    """etcd said it is gone, or its TTL passed without a renewal: final."""


class KeptLease:
    """A lease and its keep-alive loop (:meth:`run`, which the owner runs in a TaskGroup)."""

    def __init__(self, store: Store, lease_id: int, ttl: int, granted_at: float) -> None:
        self.store = store
        self.id = lease_id
        self.ttl = ttl
        self.state = LeaseState.ALIVE
        self.alive_until = granted_at + ttl
        """Loop time before which the lease surely lives (the TTL from the last answered renewal's send)."""
        self.lost = asyncio.Event()

    def alive(self) -> bool:
        """Whether the lease surely still lives now (by this process's clock)."""
        return self.state is not LeaseState.LOST and asyncio.get_running_loop().time() < self.alive_until

    def check(self) -> None:
        """:class:`LeaseLost` unless :meth:`alive`."""
        if not self.alive():
            self._lose("its TTL passed without a renewal")
            raise LeaseLost(f"lease {self.id:x} is lost")

    def _lose(self, why: str) -> None:
        if self.state is not LeaseState.LOST:
            log.warning("lease %x lost: %s", self.id, why)
        self.state = LeaseState.LOST
        self.lost.set()

    async def run(self) -> None:
        """Renew every third of the TTL until the lease is lost (then return) or the task is cancelled."""
        loop = asyncio.get_running_loop()
        interval = max(0.2, self.ttl / 3)
        while True:
            await asyncio.sleep(min(interval, max(0.0, self.alive_until - loop.time())))
            sent = loop.time()
            if sent >= self.alive_until:
                self._lose("its TTL passed without a renewal")
                return
            try:
                # A renewal later than the lease's end can only be refused: do not wait beyond it.
                async with asyncio.timeout(self.alive_until - sent):
                    ttl = await self.store.keepalive_once(self.id)
            except (TimeoutError, EtcdUnavailable) as e:
                self.state = LeaseState.UNCERTAIN
                log.info("lease %x not renewed (%s)", self.id, e or "timeout")
                continue
            if ttl <= 0:
                self._lose("etcd says it expired or was revoked")
                return
            self.state = LeaseState.ALIVE
            self.alive_until = sent + ttl


@contextlib.asynccontextmanager
async def kept_lease(store: Store, ttl: int, *, revoke: bool = True) -> AsyncIterator[KeptLease]:
    """Grant a lease and keep it alive while the block runs; revoke it after (its keys go with it).

    The keep-alive task belongs to a TaskGroup of this block (:func:`~hikkoshi.cluster.tasks.background`),
    cancelled when it ends. A lost lease
    does not interrupt the block: watch :attr:`KeptLease.lost` or call :meth:`KeptLease.check`.
    """
    loop = asyncio.get_running_loop()
    asked = loop.time()
    lease_id, granted = await store.grant(ttl)
    kept = KeptLease(store, lease_id, granted, asked)
    try:
        async with background(kept.run(), f"lease-keepalive-{lease_id:x}"):
            yield kept
    finally:
        if revoke:
            with contextlib.suppress(ClusterError):
                await store.revoke(lease_id)
