"""The links between the cluster's sites as migrations measured them (``links/<site>,<site>``): what a
prediction needs instead of an assumed bandwidth and RTT. The last measurement wins: a link's capacity
changes (another tenant, a rerouted WAN) and the newest figure is the best guess of the next move."""

from __future__ import annotations

from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.models import LinkRecord
from hikkoshi.cluster.store import Store


class Links:
    """Measured links under one key root."""

    def __init__(self, store: Store, keys: Keys | None = None) -> None:
        self.store = store
        self.keys = keys or Keys()

    async def record(self, link: LinkRecord) -> None:
        """Store ``link`` (replacing what was measured between its sites before)."""
        await self.store.put(self.keys.link(link.a, link.b), link.to_bytes())

    async def all(self) -> list[LinkRecord]:
        """Every measured link, by site pair."""
        got = await self.store.get_prefix(self.keys.links)
        out = []
        for kv in got.kvs:
            try:
                out.append(LinkRecord.from_bytes(kv.value))
            except ValueError:
                continue  # an unreadable figure is no figure: the planner assumes one
        return sorted(out, key=lambda r: (r.a, r.b))
