"""Storage modes where the destination relocates each disk from the source's export (seed 004): the
destination serves the disk at once from its cache, fetching what the guest reads, and copies the rest
in the background; the source's dirty bitmap tells which cached blocks the guest changed on the source
before the switchover, and those are dropped there. :mod:`postcopy` and :mod:`hybrid` differ only in
when the background copy starts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hikkoshi.migrate.phases import Phase
from hikkoshi.migrate.sides import SERVICE_GRACE, SideError
from hikkoshi.migrate.storage.base import Finish, MoveContext, StorageStrategy
from hikkoshi.vm.disk_serving import DiskServing, Serving


class Relocating(StorageStrategy):
    """The common part of :class:`~hikkoshi.migrate.storage.postcopy.Postcopy` and
    :class:`~hikkoshi.migrate.storage.hybrid.Hybrid`."""

    uses_bitmap = True
    #: Whether the background copy waits for the switchover.
    start_paused = False

    def destination_serving(self, ctx: MoveContext, disk: str) -> DiskServing:
        return DiskServing(
            kind=Serving.RELOCATING,
            upstream=ctx.export_uri(disk),
            background="paused" if self.start_paused else "run",
            dirty_bitmap=ctx.facts.bitmap,
            bandwidth=ctx.disk_bandwidth,
        )

    async def switchover(self, ctx: MoveContext, tg: asyncio.TaskGroup) -> Finish:
        t_stop = time.monotonic()
        figures: dict[str, Any] = {}
        done_at = t_stop

        async def invalidate(disk: str) -> None:
            nonlocal done_at
            result = await ctx.destination.relocation(disk, "invalidate")
            figures[disk] = {k: result[k] for k in ("dirty_bytes", "dropped_bytes", "seconds")}
            done_at = max(done_at, time.monotonic())

        # The source is stopped and drained: its dirty bitmaps are final. The destination drops what they
        # name while QEMU sends the rest of memory, not before it (across a WAN each is a round trip to
        # the source): the destination guest runs only after both. Until then the link is the memory
        # stream's (the guest waits for it): the copy of what is dropped goes on after the resume.
        for disk in ctx.spec.disks:
            await ctx.destination.relocation(disk.name, "pause")
        tasks = [tg.create_task(invalidate(d.name)) for d in ctx.spec.disks]

        async def finish() -> dict[str, Any]:
            await asyncio.gather(*tasks)
            return {"storage_ms": round((done_at - t_stop) * 1000, 2), "storage": figures}

        return finish

    async def after_resume(self, ctx: MoveContext) -> None:
        # Past the commit the destination's disks have nowhere else to go: requests wait for the source
        # as long as it takes (a guest waiting on a read beats a guest paused on an error).
        await _resume_relocations(ctx)
        fetched: dict[str, dict[str, Any]] = {}
        unanswered_since: float | None = None
        while True:
            if not await ctx.destination.is_running():
                # The guest runs nowhere until it is started there again (its disks carry on then); the
                # job waits for that rather than ending: the source serves the disks meanwhile.
                raise _not_running(ctx)
            try:
                disks = await ctx.destination.disk_status()
                unanswered_since = None
            except SideError as exc:
                if exc.transient:
                    raise
                # The disk service may be restarting (its relocations carry on where they stood).
                now = time.monotonic()
                unanswered_since = unanswered_since or now
                if now - unanswered_since > SERVICE_GRACE:
                    raise
                await asyncio.sleep(0.5)
                continue
            total = present = 0
            done = True
            for disk in ctx.spec.disks:
                st = disks.get(disk.name, {})
                relocation = st.get("relocation")
                total += disk.size
                if relocation is not None:
                    done = False
                    present += int(relocation["present_bytes"])
                    fetched[disk.name] = {
                        "demand_bytes": relocation["fetched_demand_bytes"],
                        "background_bytes": relocation["fetched_background_bytes"],
                        "zero_bytes": relocation["zero_bytes"],
                    }
                elif st.get("kind") == Serving.FILE.value:
                    present += disk.size
                else:
                    done = False
            step: dict[str, Any] = {
                "phase": Phase.STORAGE_POST.value,
                "disk_done": present,
                "disk_total": total,
            }
            if fetched:  # read by the guest (on demand) vs copied ahead of it (background), so far
                step["disk_demand"] = sum(int(f["demand_bytes"]) for f in fetched.values())
                step["disk_background"] = sum(int(f["background_bytes"]) for f in fetched.values())
            ctx.progress(step)
            if done:
                break
            await asyncio.sleep(0.2)
        ctx.report["disk_fetch"] = fetched


def _not_running(ctx: MoveContext) -> SideError:
    """The wait for a destination VM that is not running (see :meth:`after_resume`)."""
    return SideError(
        "the destination VM is not running and its disks are not complete; the source keeps "
        f"serving them: start it again on the destination ({ctx.destination.home_path}) to carry on",
        transient=True,
    )


async def _resume_relocations(ctx: MoveContext) -> None:
    """Patience without end, and the relocations resumed (paused until now: postcopy from the start,
    hybrid since the switchover). A disk service that does not answer is given what the loop of
    :meth:`Relocating.after_resume` gives it (it may be restarting), and a destination VM that died took
    its disk service with it: a wait for it to be started again, not the end of the migration (the fault
    campaign's kill -9 of the destination's QEMU or disk service at this phase ended it "failed", the
    source serving for good)."""
    deadline = time.monotonic() + SERVICE_GRACE
    while True:
        try:
            await ctx.destination.set_patience(None)
            for disk in ctx.spec.disks:
                await ctx.destination.relocation(disk.name, "resume")
            return
        except SideError as exc:
            if exc.transient:
                raise
            if not await ctx.destination.is_running():
                raise _not_running(ctx) from None
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
