"""How an etcd cluster is doing: its members, who leads, each member's health and database, and how
many hosts, VMs and migrations hikkoshi keeps in it (``hikkoshi cluster status``).

Each member is asked on its own (a store of one endpoint), so a member that is down shows as such
while the others answer; the member list and the counts need a quorum.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import ClusterError
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.store import Member, MemberStatus, Store

MEMBER_DEADLINE = 2.0
"""Seconds one member may take to say how it is."""


@dataclass(frozen=True)
class MemberHealth:
    """One member: what the cluster lists, and what it says of itself (None: it did not answer)."""

    member: Member
    endpoint: str | None
    status: MemberStatus | None
    problem: str | None = None

    @property
    def healthy(self) -> bool:
        """It answers, follows a leader and reports no errors."""
        return self.status is not None and self.status.leader != 0 and not self.status.errors

    @property
    def leads(self) -> bool:
        return self.status is not None and self.status.leader == self.member.id


@dataclass(frozen=True)
class ClusterHealth:
    """The cluster as a whole."""

    members: tuple[MemberHealth, ...]
    counts: dict[str, int]
    """hosts, hosts-up, vms, migrations, queued."""

    @property
    def leader(self) -> str | None:
        """The leading member's name, if one answered that it leads."""
        return next((m.member.name for m in self.members if m.leads), None)

    @property
    def healthy(self) -> bool:
        """A leader, and a majority of the members healthy."""
        well = sum(1 for m in self.members if m.healthy)
        return self.leader is not None and well > len(self.members) // 2


def endpoint_of(url: str) -> str:
    """``HOST:PORT`` of a client URL."""
    return url.split("://", 1)[-1].rstrip("/")


async def member_health(member: Member, config: EtcdConfig) -> MemberHealth:
    """Ask one member how it is."""
    if not member.client_urls:
        return MemberHealth(member, None, None, "no client URL (not started yet?)")
    endpoint = endpoint_of(member.client_urls[0])
    one = replace(
        config, endpoints=(endpoint,), attempt_timeout=MEMBER_DEADLINE / 2, deadline=MEMBER_DEADLINE
    )
    store = Store(one)
    try:
        await store.connect(check=False)
        return MemberHealth(member, endpoint, await store.member_status())
    except ClusterError as e:
        return MemberHealth(member, endpoint, None, str(e))
    finally:
        await store.close()


async def count_keys(store: Store, keys: Keys) -> dict[str, int]:
    """How many hosts (and up), VMs, migrations and queued migrations the cluster holds."""
    prefixes = {
        "hosts": keys.hosts,
        "hosts-up": keys.live_hosts,
        "vms": keys.vms,
        "migrations": keys.migrations,
        "queued": keys.queue,
    }
    counts = await asyncio.gather(*(store.count_prefix(p) for p in prefixes.values()))
    return dict(zip(prefixes, counts, strict=True))


async def cluster_health(store: Store, keys: Keys | None = None) -> ClusterHealth:
    """The members and counts (:class:`EtcdUnavailable` if the cluster has no quorum to list them)."""
    members = await store.members()
    counts = await count_keys(store, keys or Keys())
    healths = await asyncio.gather(*(member_health(m, store.config) for m in members))
    return ClusterHealth(tuple(healths), counts)
