"""Precopy storage (libvirt's way): the source QEMU mirrors every disk into the destination's disk
service (write-blocking: it always converges) until they are in sync; then memory moves; at the
switchover the ready mirrors are cancelled, which leaves each target in sync because the guest is
stopped and drained."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from hikkoshi.migrate import qmp_migration as qm
from hikkoshi.migrate.phases import Phase
from hikkoshi.migrate.sides import SideError
from hikkoshi.migrate.storage.base import Finish, MoveContext, StorageStrategy
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.disk_serving import DiskServing
from hikkoshi.vm.qemu import disk_node

#: A mirror that makes no progress for this long has stalled (a link that went silent).
STALL_SECONDS = 30.0


class Precopy(StorageStrategy):
    """See the module's docstring."""

    mode = StorageMode.PRECOPY
    needs_export = False

    def destination_serving(self, ctx: MoveContext, disk: str) -> DiskServing:
        return DiskServing()

    def destination_disks(self, ctx: MoveContext) -> dict[str, int]:
        # The mirror fills them; sparse until it does.
        return {d.file_name: d.size for d in ctx.spec.disks}

    async def before_memory(self, ctx: MoveContext) -> None:
        if not ctx.spec.disks:
            return
        address = await ctx.destination.listen_disks(
            ctx.record.id, peer=ctx.source_name, tls=ctx.tls_dir is not None
        )
        listening = address.rsplit(":", 1)[0].strip("[]")
        routed = await ctx.route("mirror", address)
        host, port = routed.rsplit(":", 1)
        ctx.facts.mirror_target = routed
        ctx.save()
        tls: dict[str, str] = {}
        if ctx.tls_dir is not None:
            # QEMU's NBD client: this host's certificate, the destination's checked by its name.
            ctx.facts.mirror_tls = True
            ctx.save()
            await qm.add_tls(ctx.source, str(ctx.tls_dir.absolute()), "client", qm.MIRROR_TLS_ID)
            tls = {"tls_creds": qm.MIRROR_TLS_ID, "tls_hostname": ctx.destination_name or listening}
        jobs = []
        for disk in ctx.spec.disks:
            node, job = f"mig-target-{disk.name}", f"mig-{disk.name}"
            await qm.add_nbd_target(ctx.source, node, host.strip("[]"), int(port), disk.name, **tls)
            ctx.facts.mirror_nodes.append(node)
            ctx.save()
            await qm.mirror(ctx.source, job, disk_node(disk.name), node)
            jobs.append(job)
            ctx.facts.mirror_jobs.append(job)
            ctx.save()
        last, last_change = -1, time.monotonic()
        while True:
            mine = [j for j in await qm.block_jobs(ctx.source) if j.device in jobs]
            if len(mine) < len(jobs):
                raise SideError("a disk mirror job ended before it was in sync")
            done = sum(j.offset for j in mine)
            ctx.progress(
                {
                    "phase": Phase.STORAGE_PRE.value,
                    "disk_done": done,
                    "disk_total": sum(j.length for j in mine),
                }
            )
            if all(j.ready for j in mine):
                ctx.report["disk_mirror_bytes"] = sum(j.length for j in mine)
                return
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                raise SideError(f"the disk mirror made no progress for {STALL_SECONDS:.0f} s", transient=True)
            await asyncio.sleep(0.2)

    async def switchover(self, ctx: MoveContext, tg: asyncio.TaskGroup) -> Finish:
        t0 = time.monotonic()
        for job in ctx.facts.mirror_jobs:
            # Ready, and the guest is stopped and drained: cancelling leaves the target in sync.
            await qm.cancel_block_job(ctx.source, job)
        await _wait_jobs_gone(ctx)
        figures = {"storage_ms": round((time.monotonic() - t0) * 1000, 2)}

        async def finish() -> dict[str, Any]:
            return figures

        return finish

    async def rollback(self, ctx: MoveContext) -> list[str]:
        if ctx.facts.mirror_jobs and ctx.facts.mirror_target is not None:
            # The mirrors' connections go first: a write-blocking mirror force-cancelled while its
            # writes hang on a silent target corrupts QEMU 7.2's heap (found by the fault campaign: the
            # link cut during the memory copy lost the guest). Cut, those writes fail at once, the jobs
            # fail, and the cancel meets nothing in flight.
            with contextlib.suppress(SideError):
                await ctx.source.ctl("mirror-cut", migration=ctx.record.id, target=ctx.facts.mirror_target)
        for job in ctx.facts.mirror_jobs:
            with contextlib.suppress(SideError):
                await qm.cancel_block_job(ctx.source, job, force=True)
        with contextlib.suppress(SideError):
            await _wait_jobs_gone(ctx)
        for node in ctx.facts.mirror_nodes:
            with contextlib.suppress(SideError):
                await qm.delete_node(ctx.source, node)
        if ctx.facts.mirror_tls:
            with contextlib.suppress(SideError):  # a later attempt adds its own
                await qm.drop_object(ctx.source, qm.MIRROR_TLS_ID)
        return await super().rollback(ctx)


async def _wait_jobs_gone(ctx: MoveContext) -> None:
    jobs = set(ctx.facts.mirror_jobs)
    for _ in range(600):
        if not any(j.device in jobs for j in await qm.block_jobs(ctx.source)):
            return
        await asyncio.sleep(0.01)
    raise SideError("the disk mirror jobs did not finish")
