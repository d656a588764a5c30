"""One disk as a disk service serves it: one export, whatever serves its bytes, and the changes between.

The export's device is always a :class:`~hikkoshi.block.tracking.TrackedDevice` (dirty bitmaps, and the
swappable reference below it). Under it, by the disk's :class:`~hikkoshi.vm.disk_serving.Serving`:

- ``file``: the raw file itself (a storage move may put a mirror there for a while);
- ``relocating``: a :class:`~hikkoshi.block.remote.Gate` over the relocation's proxy device;
- ``remote``: a gate over a pass-through to the holder's export.

Changes, each recorded in the disk plan through ``record`` before it counts:

- relocating -> file, when the relocation completes: the cache file takes the proxy's place between two
  requests (every block is local, so nothing is lost), then the proxy flushes and the bitmap is deleted;
- remote -> relocating (:meth:`ServedDisk.localize`): new requests are held and those in flight finish
  at the holder, then a relocation of the holder's export into the disk's file serves them; it goes on
  to ``file`` as any relocation does.

A QEMU connected to the export notices none of it: the export and its size stay the same, and whatever
serves the disk later can do at least what was advertised when QEMU connected (a pass-through promises
the least; a relocation's cache and the file it becomes promise the same).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hikkoshi.block.file import RawFile
from hikkoshi.block.move_journal import recover
from hikkoshi.block.remote import Gate, RemoteDevice
from hikkoshi.block.throttle import parse_rate
from hikkoshi.block.tracking import TrackedDevice
from hikkoshi.block.upstream import Upstream
from hikkoshi.daemons.relocation import Relocation, RelocationOptions, bitmap_path
from hikkoshi.nbd.client import Reconnect
from hikkoshi.nbd.control import ControlError
from hikkoshi.nbd.uri import NbdUri
from hikkoshi.vm.disk_serving import DiskServing, Serving

log = logging.getLogger("hikkoshi.daemons.disk")

Record = Callable[[str, DiskServing], None]


class ServedDisk:
    """One export and what serves it (see the module's docstring)."""

    def __init__(
        self,
        name: str,
        path: Path,
        size: int | None,
        serving: DiskServing,
        *,
        read_only: bool = False,
        relocation_options: RelocationOptions | None = None,
        planned: bool = True,
        describe_path: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.serving = serving
        self.read_only = read_only
        #: The disk plan is this disk's truth (a VM's disk, not an image served by hand).
        self.planned = planned
        self._describe_path = describe_path
        #: Makes a change of how the disk is served durable (the disk service's disk plan).
        self.record: Record = lambda _name, _serving: None
        self._options = relocation_options or RelocationOptions()
        #: The client context for an ``nbds://`` upstream (a relocation's source, a remote disk's holder).
        self.tls = tls
        self.tracked: TrackedDevice | None = None
        self.relocation: Relocation | None = None
        self.remote: Upstream | None = None
        self._gate: Gate | None = None
        self._changed = asyncio.Event()
        self.error: str | None = None

    # --- opening -------------------------------------------------------------------------------------------

    async def open(self) -> TrackedDevice:
        """Open what serves the disk now; the export's device."""
        kind = self.serving.kind
        if kind == Serving.FILE:
            if self.planned:
                # A crash may have left a finished relocation's bitmap: the plan says file, so it is stale.
                bitmap_path(self.path).unlink(missing_ok=True)
            device = TrackedDevice(RawFile(recover(self.path), read_only=self.read_only))
        elif kind == Serving.RELOCATING:
            self.relocation = await self._open_relocation(self.serving, None)
            self._gate = Gate(self.relocation.proxy)
            device = TrackedDevice(self._gate)
        else:
            device = TrackedDevice(self._open_remote(self.serving))
        self.size = device.size
        self.tracked = device
        return device

    async def _open_relocation(self, serving: DiskServing, upstream: Upstream | None) -> Relocation:
        assert serving.upstream is not None
        options = RelocationOptions(
            block_size=self._options.block_size,
            connections=self._options.connections,
            upstream_timeout=self._options.upstream_timeout,
            start_paused=serving.background == "paused",
            dirty_bitmap=serving.dirty_bitmap,
            bandwidth=_rate(serving.bandwidth),
            tls=self.tls,
        )
        return await Relocation.open(NbdUri.parse(serving.upstream), self.path, options, self.size, upstream)

    def _open_remote(self, serving: DiskServing) -> Gate:
        assert serving.upstream is not None and self.size is not None
        # The holder is the only copy: a request waits for it as long as it takes (the guest sees a slow
        # disk, not an error that pauses it), and the connection comes back by itself.
        uri = NbdUri.parse(serving.upstream)
        self.remote = Upstream(
            uri, connections=1, reconnect=Reconnect(deadline=None), tls=self.tls if uri.tls else None
        )
        self._gate = Gate(RemoteDevice(self.remote, self.size))
        return self._gate

    # --- the life of the disk ------------------------------------------------------------------------------

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Serve until the service stops: connect a remote disk; carry a relocation through to ``file``."""
        while True:
            if self.serving.kind == Serving.REMOTE and self.remote is not None and not self.remote.clients:
                assert self.size is not None
                try:
                    await self.remote.open(self.size)
                except (OSError, ValueError) as exc:
                    # Requests made meanwhile fail; the next ones reconnect through the client's policy.
                    self.error = f"holder {self.serving.upstream}: {exc}"
                    log.error("disk %s: %s", self.name, self.error)
            if self.relocation is not None:
                try:
                    await self.relocation.run(tg)
                except (OSError, ValueError) as exc:
                    self.error = f"relocation from {self.serving.upstream}: {exc}"
                    log.error("disk %s: %s", self.name, self.error)
                    await self._changed.wait()
                    self._changed.clear()
                    continue
                await self._become_file()
                continue
            await self._changed.wait()
            self._changed.clear()

    async def _become_file(self) -> None:
        relocation, tracked = self.relocation, self.tracked
        assert relocation is not None and tracked is not None and relocation.complete
        # Between two requests: every block is local, the file serves from now on.
        tracked.replace_inner(relocation.file)
        await relocation.hand_over()
        self.relocation = None
        self._gate = None
        self._set(DiskServing())
        await relocation.drop_bitmap()
        log.info("disk %s: relocation complete; served from %s", self.name, self.path)

    def _set(self, serving: DiskServing) -> None:
        self.record(self.name, serving)  # durable first: a restart serves it this way
        self.serving = serving

    async def localize(self) -> None:
        """A remote disk becomes a relocation of the holder's export into the disk's own file."""
        if self.serving.kind != Serving.REMOTE:
            raise ControlError(f"disk {self.name} is {self.serving.kind}, not remote")
        gate, remote = self._gate, self.remote
        assert gate is not None and remote is not None and self.serving.upstream is not None
        if self.path.exists():
            raise ControlError(f"{self.path} exists already; a remote disk has no file here")
        relocating = DiskServing(kind=Serving.RELOCATING, upstream=self.serving.upstream)
        async with gate.drain():
            # Nothing is in flight to the holder now: whatever it acknowledged is what the copy reads.
            relocation = await self._open_relocation(relocating, remote)
            gate.inner = relocation.proxy
            self._set(relocating)
            self.relocation = relocation
            self.remote = None
        self._changed.set()

    def wake(self) -> None:
        """Something changed that :meth:`run` must look at."""
        self._changed.set()

    # --- facts ---------------------------------------------------------------------------------------------

    def need_relocation(self) -> Relocation:
        """The relocation of this disk, or a clear error."""
        if self.relocation is None:
            raise ControlError(f"disk {self.name} is {self.serving.kind}, not relocating")
        return self.relocation

    def status(self) -> dict[str, Any]:
        """How the disk is served, JSON-ready."""
        out: dict[str, Any] = {
            "kind": self.serving.kind.value,
            "size": self.size,
            "path": str(self.served_path) if self.served_path else None,
            "error": self.error,
        }
        if self.serving.kind != Serving.FILE:
            out["upstream"] = self.serving.upstream
        if self.serving.holder is not None:
            out["holder"] = self.serving.holder.model_dump()
        if self.relocation is not None:
            out["relocation"] = self.relocation.status()
        if self.remote is not None:
            out["connected"] = self.remote.connected
        return out

    @property
    def description(self) -> str:
        """What the export's description says (a host path only if asked)."""
        if self._describe_path:
            return str(self.path.resolve())
        return f"disk {self.name}" if self.planned else ""

    @property
    def served_path(self) -> Path | None:
        """The file that serves the disk now (a storage move may have switched it), if it is a file."""
        if self.tracked is None:
            return None
        inner = self.tracked.inner
        return inner.path if isinstance(inner, RawFile) else None

    async def close(self) -> None:
        """The service stops: flush and release (a relocation keeps its cache and bitmap for next time)."""
        tracked, self.tracked = self.tracked, None
        if tracked is None:
            return
        clean = False
        try:
            await tracked.flush()
            clean = True
        except OSError as exc:
            log.error("disk %s: final flush failed: %s", self.name, exc)
        if self.relocation is not None:
            upstream = self.relocation.proxy.upstream
            self.relocation.close(clean)
            await upstream.close()
        elif self.remote is not None:
            await self.remote.close()
        else:
            tracked.close()


def _rate(text: str | None) -> float | None:
    return parse_rate(text) if text else None
