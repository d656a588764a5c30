"""A VM whose disk is still being relocated to this host moves on only once the relocation finished.

Chaining instead (the next destination pulling what is local from here and the rest from the original
source) would make three hosts depend on each other for one disk, and the loss of any of them lose the
guest's data; finishing first keeps every move between two hosts. The wait is short in practice (the
relocation runs at full speed from the moment a move is asked: its bandwidth limit is lifted) and
bounded: it shows progress, and gives up (nothing touched) if the copy stalls or cannot finish in the
time its measured rate needs, with a margin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.vm.disk_serving import DiskServing, Serving

#: A relocation that copies nothing for this long has stalled.
STALL_SECONDS = 60.0
#: The wait may take this many times what the measured rate needs, plus a minute.
MARGIN = 3.0


def serving_of(status: dict[str, Any]) -> DiskServing:
    """A disk's serving as the disk service's ``status`` describes it."""
    kind = Serving(status.get("kind", "file"))
    if kind == Serving.FILE:
        return DiskServing()
    return DiskServing(kind=kind, upstream=status.get("upstream"), holder=status.get("holder"))


async def settle_relocations(
    side: VmSide, progress: Callable[[dict[str, Any]], None]
) -> dict[str, DiskServing]:
    """How each disk of ``side`` is served, once none is relocating any more (see the module)."""
    t0 = time.monotonic()
    best, best_at = -1, t0
    while True:
        disks = await side.disk_status()
        relocating = {n: s["relocation"] for n, s in disks.items() if s.get("relocation")}
        if not relocating:
            return {name: serving_of(status) for name, status in disks.items()}
        for name, relocation in relocating.items():
            if relocation.get("paused") or relocation.get("bandwidth"):
                await side.disks("bandwidth", export=name, rate=None)
                await side.disks("resume", export=name)
        present = sum(int(r["present_bytes"]) for r in relocating.values())
        total = sum(int(r["size"]) for r in relocating.values())
        rate = sum(float(r.get("rate_bytes_s") or 0) for r in relocating.values())
        progress(
            {"phase": "precheck", "waiting_for": "relocation", "disk_done": present, "disk_total": total}
        )
        now = time.monotonic()
        if present > best:
            best, best_at = present, now
        elif now - best_at > STALL_SECONDS:
            names = ", ".join(sorted(relocating))
            raise SideError(f"disk {names} is still relocating and copied nothing for {STALL_SECONDS:.0f} s")
        if rate > 0 and now - t0 > 60 + MARGIN * (total - present) / rate + (now - t0) / MARGIN:
            raise SideError(f"the relocation of {', '.join(sorted(relocating))} would take too long")
        await asyncio.sleep(0.5)
