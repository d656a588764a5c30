"""A VM comes home to the host that holds its disks (it left with shared storage): whatever mode was
asked, no disk data moves. The holder's supervisor, serving the disks since the VM left, takes QEMU up
again with its own disks; the source lets go of its home (it had no disk files)."""

from __future__ import annotations

from hikkoshi.migrate.storage.base import MoveContext, StorageStrategy, release_source
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.disk_serving import DiskServing


class TakeBack(StorageStrategy):
    """See the module's docstring."""

    moves_disks = False
    needs_export = False

    def __init__(self, mode: StorageMode) -> None:
        self.mode = mode

    def destination_serving(self, ctx: MoveContext, disk: str) -> DiskServing:
        return DiskServing()  # its own files

    async def prepare(self, ctx: MoveContext) -> None:
        ctx.facts.destination_takes_back = True
        ctx.save()

    async def release(self, ctx: MoveContext) -> None:
        await release_source(ctx)
