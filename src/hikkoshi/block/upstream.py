"""The source of a relocation: several NBD client connections to one export, with reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import replace
from types import TracebackType

from hikkoshi.nbd.client import NbdClient, Reconnect
from hikkoshi.nbd.constants import BASE_ALLOCATION, HIKKOSHI_HEAT
from hikkoshi.nbd.errors import CommandError
from hikkoshi.nbd.uri import NbdUri

log = logging.getLogger("hikkoshi.block.upstream")


class Upstream:
    """Connections to the source export.

    With multi-conn the source guarantees consistency across connections, so fetches are spread over
    ``connections`` clients; otherwise one client carries everything (still pipelined).
    """

    def __init__(
        self,
        uri: NbdUri | str,
        connections: int = 4,
        reconnect: Reconnect | None = None,
        tls: ssl.SSLContext | None = None,
        extra_contexts: tuple[str, ...] = (),
    ) -> None:
        self.uri = NbdUri.parse(uri) if isinstance(uri, str) else uri
        #: More meta contexts to negotiate (a migration's dirty bitmap on the source).
        self.extra_contexts = extra_contexts
        self.want = max(1, connections)
        self.reconnect = reconnect or Reconnect()
        self.tls = tls
        self.clients: list[NbdClient] = []
        self._next = 0
        self.closed = False
        #: Set while ``open`` runs: requests made meanwhile wait for it (a proxy may serve before its
        #: source is reached); its exception, if it failed.
        self._opening: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Upstream:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self, size: int | None = None) -> None:
        """Connect to the source; requests made meanwhile wait for it, and fail if it fails.

        ``size``: what the source must be (a cache made before it was reached); none of those requests
        is sent to a source of another size."""
        self._opening = asyncio.get_running_loop().create_future()
        self._opening.add_done_callback(lambda f: f.cancelled() or f.exception())  # waiters may be none
        try:
            await self._open()
            if size is not None and self.size != size:
                actual = self.size
                await self.close()
                raise ValueError(f"the upstream {self.uri} is {actual} bytes, not {size}")
        except BaseException as exc:
            self._opening.set_exception(ConnectionError(f"{self.uri}: could not connect: {exc}"))
            raise
        self._opening.set_result(None)

    async def wait_open(self) -> None:
        """Return once ``open`` has connected (at once if it has, or was never called)."""
        if self._opening is not None:
            await asyncio.shield(self._opening)  # a waiter that is cancelled leaves it to the others

    async def _open(self) -> None:
        # Every connection at once: over a WAN each costs a round trip or two, and one after another
        # they add up. Whether the source allows more than one (multi-conn) is only known once they are
        # open; without it all but the first are closed again.
        opened = await asyncio.gather(*(self._client() for _ in range(self.want)), return_exceptions=True)
        clients = [c for c in opened if isinstance(c, NbdClient)]
        failed = [e for e in opened if not isinstance(e, NbdClient)]
        if failed or not clients[0].can_multi_conn:
            for extra in clients[1:] if not failed else clients:
                with contextlib.suppress(OSError, CommandError):
                    await extra.__aexit__(None, None, None)
        if failed:
            raise failed[0]
        self.clients = clients if clients[0].can_multi_conn else clients[:1]

    async def _client(self) -> NbdClient:
        client = NbdClient(
            self.uri,
            tls=self.tls,
            meta_contexts=(BASE_ALLOCATION, HIKKOSHI_HEAT, *self.extra_contexts),
            reconnect=self.reconnect,
        )
        await client.__aenter__()
        return client

    async def close(self) -> None:
        """Disconnect every connection (the relocation no longer needs the source)."""
        self.closed = True
        clients, self.clients = self.clients, []
        for client in clients:
            with contextlib.suppress(OSError, CommandError):
                await client.__aexit__(None, None, None)

    @property
    def size(self) -> int:
        return self.clients[0].size

    @property
    def identity(self) -> str:
        """What the cache's bitmap must match: where the source is and how big."""
        return f"{self.uri} size={self.size}"

    @property
    def connected(self) -> bool:
        return any(c.connected for c in self.clients)

    @property
    def max_request(self) -> int:
        return min(c.max_request for c in self.clients)

    def _pick(self, demand: bool = False) -> NbdClient:
        """Connection 0 carries what a guest waits for; the background copy uses the others, so a demand
        fetch never queues behind megabytes of background replies on the same stream."""
        if not self.clients:
            raise ConnectionError("upstream is closed")
        if demand or len(self.clients) == 1:
            return self.clients[0]
        self._next = self._next % (len(self.clients) - 1) + 1
        return self.clients[self._next]

    async def read(self, offset: int, length: int, demand: bool = False) -> bytes:
        await self.wait_open()
        return await self._pick(demand).read(offset, length)

    async def read_buffer(self, offset: int, length: int, demand: bool = False) -> bytearray:
        await self.wait_open()
        return await self._pick(demand).read_buffer(offset, length)

    async def read_into(self, offset: int, buffer: bytearray, demand: bool = False) -> bytearray:
        await self.wait_open()
        return await self._pick(demand).read_into(offset, buffer)

    def set_deadline(self, deadline: float | None) -> None:
        """How long a request waits for a lost source from now on (``None``: as long as it takes)."""
        self.reconnect = replace(self.reconnect, deadline=deadline)
        for client in self.clients:
            client.reconnect = self.reconnect

    # Writes go to the first connection with the demand reads: a pass-through's requests stay in one
    # pipeline, and a flush there covers them (and, with multi-conn, every other connection's too).

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self.wait_open()
        await self._pick(True).write(offset, data, fua)

    async def flush(self) -> None:
        await self.wait_open()
        await self._pick(True).flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.wait_open()
        await self._pick(True).trim(offset, length, fua)

    async def write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
    ) -> None:
        await self.wait_open()
        await self._pick(True).write_zeroes(offset, length, no_hole=no_hole, fua=fua)

    def has_context(self, name: str) -> bool:
        return bool(self.clients) and name in self.clients[0].contexts

    async def extents(
        self, offset: int, length: int, context: str = BASE_ALLOCATION
    ) -> list[tuple[int, int]]:
        await self.wait_open()
        return await self._pick().block_status(offset, length, context)

    async def map(self, context: str = BASE_ALLOCATION, step: int = 1 << 30) -> list[tuple[int, int, int]]:
        """The whole disk as (offset, length, flags) from block status, in order."""
        out: list[tuple[int, int, int]] = []
        pos = 0
        size = self.size
        while pos < size:
            extents = await self.extents(pos, min(step, size - pos), context)
            for length, flags in extents:
                length = min(length, size - pos)
                if length <= 0:
                    break
                if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + length, flags)
                else:
                    out.append((pos, length, flags))
                pos += length
        return out
