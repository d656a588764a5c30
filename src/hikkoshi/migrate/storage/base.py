"""What a storage mode does in a migration, as one object per mode (:mod:`shared`, :mod:`precopy`,
:mod:`postcopy`, :mod:`hybrid`, and :mod:`take_back` for a VM coming home to the host that holds its
disks): how the destination serves each disk, what is prepared on the source, what happens before the
memory moves, at the switchover, after the destination runs, what the source keeps or releases at the
end, and what a rollback undoes. The live migration job calls these at its phases and knows nothing
of any mode itself.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hikkoshi.daemons import supervisor_client
from hikkoshi.migrate.destination import Destination
from hikkoshi.migrate.record import MigrationFacts, MigrationRecord
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.migrate.storage_modes import StorageMode, bitmap_name
from hikkoshi.vm.disk_serving import DiskServing, Holder, Serving
from hikkoshi.vm.spec import VmSpec

Route = Callable[[str, str], Awaitable[str]]
"""``route(purpose, "host:port") -> "host:port"``: the address to use instead, e.g. a WAN emulator's
relay. Purposes: ``stream`` (memory), ``mirror`` (precopy writes to the destination), ``export`` (the
destination reads the source's disks)."""

ReleaseHolder = Callable[[Holder, str], Awaitable[None]]
"""Tell the host that holds a disk (shared storage) that the VM no longer needs it there (migration
id given): its serving supervisor exits and the VM's home there is deleted."""


@dataclass
class MoveContext:
    """What a storage strategy works with."""

    record: MigrationRecord
    spec: VmSpec
    source: VmSide
    destination: Destination
    source_address: str
    """Where the source's disk service listens for the destination (its migration address)."""
    source_host: str
    """The source host's name (a holder's name when the disks stay here)."""
    source_agent: str | None
    """The source's agent URL, if it has one (a holder's address when the disks stay here)."""
    source_disks: dict[str, DiskServing]
    """How the source serves each disk now (never ``relocating``: those are finished first)."""
    disk_bandwidth: str | None
    route: Route
    save: Callable[[], None]
    progress: Callable[[dict[str, Any]], None]
    release_holder: ReleaseHolder
    report: dict[str, Any] = field(default_factory=dict)
    tls_dir: Path | None = None
    """The source host's TLS files (QEMU's layout): every stream between the hosts is encrypted with
    them; ``None``: plain TCP (loopback only)."""
    source_name: str | None = None
    """The name the source's certificate has (the destination checks it); ``None``: its address."""

    @property
    def facts(self) -> MigrationFacts:
        """The record's facts."""
        return self.record.facts

    @property
    def destination_name(self) -> str | None:
        """The name the destination's certificate has (only it is admitted); ``None``: any host of the
        cluster CA (a destination reached by path)."""
        return self.destination.tls_name

    def export_uri(self, disk: str) -> str:
        """The source's export of ``disk`` as the destination reaches it."""
        return self.facts.exports[disk]

    def listen_args(self, *, read_only: bool) -> dict[str, Any]:
        """The disk service's ``listen`` for the destination: on the source's migration address, for
        this migration, admitting the destination's certificate only (with TLS)."""
        args: dict[str, Any] = {
            "address": f"{self.source_address}:0",
            "read_only": read_only,
            "migration": self.record.id,
        }
        if self.tls_dir is not None:
            args["tls_dir"] = str(self.tls_dir.absolute())
            if self.destination_name is not None:
                args["peer"] = self.destination_name
        return args

    def uri_of(self, address: str, disk: str) -> str:
        """The URI of the source's export ``disk`` at ``address`` (``host:port``)."""
        if self.tls_dir is None:
            return f"nbd://{address}/{disk}"
        expect = f"?tls-hostname={self.source_name}" if self.source_name else ""
        return f"nbds://{address}/{disk}{expect}"


Finish = Callable[[], Awaitable[dict[str, Any]]]


async def _nothing() -> dict[str, Any]:
    return {}


class StorageStrategy(abc.ABC):
    """One storage mode (see the module's docstring)."""

    mode: StorageMode
    moves_disks: bool = True
    """Whether the destination ends with its own copy (and the source's disks go)."""
    needs_export: bool = True
    """Whether the destination reads the source's disk service."""
    uses_bitmap: bool = False
    """Whether the source tracks writes for the switchover's invalidation."""
    export_writable: bool = False
    """Whether the destination writes through the source's export (else it only reads it)."""

    @abc.abstractmethod
    def destination_serving(self, ctx: MoveContext, disk: str) -> DiskServing:
        """How the destination serves ``disk``."""

    def destination_disks(self, ctx: MoveContext) -> dict[str, int]:
        """Empty disk files the destination creates first (file name to size)."""
        return {}

    async def prepare(self, ctx: MoveContext) -> None:
        """On the source, before the destination exists: its export, its dirty bitmaps; the hosts that
        hold its disks, to release at the end (recorded now: the source's own view goes with it)."""
        if self.moves_disks:
            ctx.facts.holders = holders(ctx)
        if self.needs_export and ctx.spec.disks:
            # Recorded first: a rollback closes every listener of this migration.
            ctx.facts.source_listen = f"migration {ctx.record.id}"
            ctx.save()
            names = await ctx.source.disks("listen", **ctx.listen_args(read_only=not self.export_writable))
            ctx.facts.source_listen = str(names[0])
            reach = await ctx.route("export", str(names[0]))
            ctx.facts.exports = {d.name: ctx.uri_of(reach, d.name) for d in ctx.spec.disks}
        if self.uses_bitmap:
            # Before the destination reads anything: every later write is marked.
            name = bitmap_name(ctx.record.id)
            for disk in ctx.spec.disks:
                await ctx.source.disks("bitmap-add", export=disk.name, name=name)
            ctx.facts.bitmap = name
        ctx.save()

    async def before_memory(self, ctx: MoveContext) -> None:
        """After the destination started, before the memory moves (precopy mirrors)."""
        return None

    async def switchover(self, ctx: MoveContext, tg: asyncio.TaskGroup) -> Finish:
        """The source is stopped and drained: the storage's part before the rest of memory goes; the
        returned coroutine function finishes it once memory has moved (its figures for the report).
        Work that overlaps the memory's last part runs as tasks of ``tg`` (the job's)."""
        return _nothing

    async def after_resume(self, ctx: MoveContext) -> None:
        """The destination runs: whatever still has to move does (post-copy)."""
        return None

    async def release(self, ctx: MoveContext) -> None:
        """The destination holds everything it needs: the source lets go (its supervisor exits and its
        home goes), and so do the hosts that held its disks."""
        await release_source(ctx)
        await release_holders(ctx)

    async def rollback(self, ctx: MoveContext) -> list[str]:
        """Undo the source side's part (the migration itself is cancelled by the job); problems left."""
        problems: list[str] = []
        if ctx.facts.source_listen:
            with contextlib.suppress(SideError):  # the destination's connections end with it
                await ctx.source.disks("unlisten", migration=ctx.record.id)
        if ctx.facts.bitmap:
            for disk in ctx.spec.disks:
                with contextlib.suppress(SideError):
                    await ctx.source.disks("bitmap-remove", export=disk.name, name=ctx.facts.bitmap)
        return problems


def holders(ctx: MoveContext) -> list[Holder]:
    """The hosts holding the source's remote disks."""
    out: list[Holder] = []
    for serving in ctx.source_disks.values():
        if serving.kind == Serving.REMOTE and serving.holder is not None and serving.holder not in out:
            out.append(serving.holder)
    return out


async def release_source(ctx: MoveContext) -> None:
    """The source's supervisor (serving since the hand-off) exits and its home is deleted."""
    home = ctx.source.home
    if home.path.exists() and home.is_running():
        for _ in range(300):  # QEMU quits after the hand-off, then the supervisor says so
            if home.read_state().get("state") == "serving":
                break
            await asyncio.sleep(0.05)
        await ctx.source.ctl("release")
        if not await asyncio.to_thread(supervisor_client.wait_stopped, home, 60):
            raise SideError("the source supervisor did not exit after release")
    if home.path.exists():
        await asyncio.to_thread(shutil.rmtree, home.path)


async def release_holders(ctx: MoveContext) -> None:
    """The hosts that held the source's disks (recorded at prepare) let them go, one by one."""
    for holder in list(ctx.facts.holders):
        await ctx.release_holder(holder, ctx.record.id)
        ctx.facts.holders.remove(holder)
        ctx.save()
