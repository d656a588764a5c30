"""Shared storage: only memory moves; the destination serves each disk as a pass-through to the host
that holds its files. A disk that was a file here stays here (this host becomes its holder and keeps
serving it); a disk that was held elsewhere stays there."""

from __future__ import annotations

from hikkoshi.migrate.storage.base import MoveContext, StorageStrategy, release_source
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.disk_serving import DiskServing, Holder, Serving


class Shared(StorageStrategy):
    """See the module's docstring."""

    mode = StorageMode.SHARED
    moves_disks = False
    export_writable = True  # the destination's pass-through writes to the holder

    def _held_here(self, ctx: MoveContext) -> bool:
        return any(s.kind == Serving.FILE for s in ctx.source_disks.values())

    async def prepare(self, ctx: MoveContext) -> None:
        # An export only for disks held here (the others are reached at their holder).
        self.needs_export = self._held_here(ctx)
        await super().prepare(ctx)

    def destination_serving(self, ctx: MoveContext, disk: str) -> DiskServing:
        here = ctx.source_disks.get(disk, DiskServing())
        if here.kind == Serving.REMOTE:
            return here  # the same holder serves the destination
        home = str(ctx.source.home.path) if ctx.source_agent is None else None
        holder = Holder(host=ctx.source_host, agent=ctx.source_agent, home=home)
        return DiskServing(kind=Serving.REMOTE, upstream=ctx.export_uri(disk), holder=holder)

    async def release(self, ctx: MoveContext) -> None:
        if not self._held_here(ctx):
            await release_source(ctx)  # nothing of the VM is left here
        # Else this host is the disks' holder now: its supervisor serves them to the destination.
