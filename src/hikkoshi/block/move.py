"""A storage move: copy a served disk to another file while the guest uses it, then serve that file.

Steps (seed 000, ESX 4 and 5):

1. Check the destination (must not exist; enough space), journal ``copying``, create it thin or thick.
2. Put a :class:`~hikkoshi.block.mirror.MirrorDevice` under the export's tracking layer; mark every
   allocated block of the source pending (holes are never copied: they stay holes).
3. Copy passes (``dbt``: re-copy what was dirtied; ``mirror``: writes behind the cursor go to both sides),
   as :class:`~hikkoshi.block.move_policy.MovePolicy` decides; ``dbt`` falls back to ``mirror``.
4. Switch: flush the destination; hold writes; copy the remainder; flush again; journal ``switched``;
   the export serves the destination; release the writes. No guest pause: reads go on throughout.
5. Close and delete the source, drop the journal.

Any failure before step 4 ends (including cancellation) puts the source back under the export, releases
held writes to it, and deletes the partial copy. After the journal says ``switched`` there is no way
back: the destination is the disk.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hikkoshi.block import crashpoints
from hikkoshi.block.file import RawFile
from hikkoshi.block.mirror import MirrorDevice
from hikkoshi.block.move_journal import Journal, fsync_dir
from hikkoshi.block.move_policy import Mode, MovePolicy, PassResult, Step
from hikkoshi.block.throttle import Throttle
from hikkoshi.block.tracking import TrackedDevice
from hikkoshi.nbd.constants import BASE_ALLOCATION, AllocationFlag

log = logging.getLogger("hikkoshi.block.move")

#: Bytes copied per job (one worker thread call).
CHUNK_BYTES = 1 << 20
#: Most runs of pending blocks in one job: a pass over scattered guest writes copies many small runs
#: per thread call, not one (each call waits for the event loop, which is busy with those writes).
JOB_RUNS = 64
#: Jobs in flight at once (worker threads copy them).
WORKERS = 4
#: The finest tracking of what a move still has to copy: a guest's 4 KiB write leaves 4 KiB to re-copy
#: (dbt) rather than a whole coarser block.
MIN_GRANULARITY = 4096
#: The most blocks the move's pending map has (one byte each: 16 MiB, a 64 TiB disk at 4 KiB).
MAX_BLOCKS = 1 << 24


def move_granularity(size: int) -> int:
    """The block size of a move's pending map: MIN_GRANULARITY, coarser only for very large disks."""
    g = MIN_GRANULARITY
    while (size + g - 1) // g > MAX_BLOCKS:
        g <<= 1
    return g


class MoveError(Exception):
    """The move cannot start or did not finish; the source is still the disk."""


class Phase(enum.StrEnum):
    PREPARING = "preparing"
    COPYING = "copying"
    SWITCHING = "switching"
    CLEANUP = "cleanup"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class MoveProgress:
    """What a move reports (``move-status``)."""

    source: str
    dest: str
    mode: Mode
    thick: bool
    phase: Phase = Phase.PREPARING
    fallback: bool = False
    size: int = 0
    #: Bytes of the first pass (the allocated part of the source).
    initial_bytes: int = 0
    copied_bytes: int = 0
    zero_bytes: int = 0
    #: Bytes still to copy, counted when asked (counting scans the whole pending map).
    pending: Callable[[], int] = field(default=lambda: 0, repr=False)
    passes: list[PassResult] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    #: How long writes were held at the switch.
    hold_seconds: float = 0.0
    error: str | None = None

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """Bytes/s copied so far."""
        return (self.copied_bytes + self.zero_bytes) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def pending_bytes(self) -> int:
        return self.pending() if self.phase in (Phase.COPYING, Phase.SWITCHING) else 0

    @property
    def eta(self) -> float | None:
        if self.phase is not Phase.COPYING or self.rate <= 0:
            return None
        return self.pending_bytes / self.rate

    def snapshot(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dest": self.dest,
            "mode": str(self.mode),
            "fallback_to_mirror": self.fallback,
            "thick": self.thick,
            "phase": str(self.phase),
            "size": self.size,
            "initial_bytes": self.initial_bytes,
            "copied_bytes": self.copied_bytes,
            "zero_bytes": self.zero_bytes,
            "pending_bytes": self.pending_bytes,
            "passes": [
                {"copied_bytes": p.copied_bytes, "remaining_bytes": p.remaining_bytes, "seconds": p.seconds}
                for p in self.passes
            ],
            "elapsed": round(self.elapsed, 3),
            "rate": round(self.rate),
            "eta": None if self.eta is None else round(self.eta, 1),
            "hold_ms": round(self.hold_seconds * 1000, 2),
            "error": self.error,
        }


class StorageMove:
    """Moves the file under one export's :class:`TrackedDevice` to ``dest``."""

    def __init__(
        self,
        tracker: TrackedDevice,
        dest: Path,
        mode: Mode = Mode.MIRROR,
        thick: bool = False,
        bandwidth: float | None = None,
        policy: MovePolicy | None = None,
        granularity: int | None = None,
    ) -> None:
        source = tracker.inner
        if not isinstance(source, RawFile) or source.capabilities.read_only:
            raise MoveError("only a writable export served from a file can be moved")
        self.tracker = tracker
        self.source = source
        self.dest = Path(os.path.abspath(dest))
        self.throttle = Throttle(bandwidth)
        self.policy = policy or MovePolicy()
        self.granularity = move_granularity(source.size) if granularity is None else granularity
        self._journal = Journal(Path(os.path.abspath(source.path)), self.dest, "copying")
        self.progress = MoveProgress(str(self._journal.source), str(self.dest), mode, thick, size=source.size)
        self._mirror: MirrorDevice | None = None

    # --- preparing ----------------------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a move that cannot work, before anything is written (raises :class:`MoveError`)."""
        src = self._journal.source
        if self.dest == src:
            raise MoveError("the destination is the source")
        if self.dest.exists():
            raise MoveError(f"{self.dest} exists; refusing to overwrite it")
        if not self.dest.parent.is_dir():
            raise MoveError(f"no directory {self.dest.parent}")
        if Journal.path_for(src).exists():
            raise MoveError(f"{Journal.path_for(src)} exists: another move of this disk is under way")
        st = os.statvfs(self.dest.parent)
        free = st.f_bavail * st.f_frsize
        need = self.source.size if self.progress.thick else self._allocated_bytes()
        if need > free:
            raise MoveError(f"{self.dest.parent} has {free} bytes free; the disk needs {need}")

    def _allocated_bytes(self) -> int:
        return sum(n for n, flags in self._source_extents() if not flags & AllocationFlag.HOLE)

    def _source_extents(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos, size = 0, self.source.size
        while pos < size:
            ext = self.source.extents(BASE_ALLOCATION, pos, size - pos)
            if not ext:
                ext = [(size - pos, 0)]
            out += ext
            pos += sum(n for n, _ in ext)
        return out

    def _create_destination(self) -> RawFile:
        fd = os.open(self.dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, os.fstat(self.source.fd).st_mode & 0o777)
            os.ftruncate(fd, self.source.size)
            if self.progress.thick and self.source.size:
                os.posix_fallocate(fd, 0, self.source.size)
        finally:
            os.close(fd)
        fsync_dir(self.dest.parent)
        return RawFile(self.dest)

    # --- running ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Carry the move out; raise :class:`MoveError` (source intact) if it does not finish."""
        p = self.progress
        try:
            self.check()
            self._journal.write()
            try:
                dest = self._create_destination()
            except OSError:
                self._remove_destination(None)
                raise
            mirror = self._mirror = MirrorDevice(self.source, dest, p.mode, self.granularity, p.thick)
            pos = 0
            for n, flags in self._source_extents():
                if not flags & AllocationFlag.HOLE:
                    mirror.pending.mark(pos, n)
                pos += n
            p.initial_bytes = mirror.pending.dirty_bytes
            pending = mirror.pending
            p.pending = lambda: pending.dirty_bytes
            self.tracker.replace_inner(mirror)
            p.phase = Phase.COPYING
            crashpoints.reached("move-copying")
            await self._converge(mirror)
            p.phase = Phase.SWITCHING
            await self._switch(mirror)
        except asyncio.CancelledError:
            if self._journal.state != "switched":
                p.phase = Phase.CANCELLED
                p.error = "cancelled"
                p.finished = time.monotonic()
                await self._undo()
            raise
        except Exception as exc:  # whatever it was, the source must be put back
            p.phase = Phase.FAILED
            p.error = str(exc)
            if not isinstance(exc, (OSError, MoveError)):
                log.exception("storage move failed")
            p.finished = time.monotonic()
            await self._undo()
            raise MoveError(str(exc)) from exc
        p.phase = Phase.CLEANUP
        try:
            await self._drop_source()
        except OSError as exc:
            # The destination is the disk and serves; only the stale source is left behind.
            p.error = f"moved, but removing the source failed: {exc}"
            log.error("%s", p.error)
        p.finished = time.monotonic()
        p.phase = Phase.DONE

    async def _converge(self, mirror: MirrorDevice) -> None:
        p = self.progress
        while True:
            step = self.policy.next_step(mirror.mode, p.passes, p.rate)
            if step is Step.SWITCH:
                return
            if step is Step.FALLBACK:
                log.info("dbt passes stopped converging; going on as a mirror")
                mirror.mode = Mode.MIRROR
                p.fallback = True
            t0 = time.monotonic()
            copied = await self._copy_pass(mirror)
            p.passes.append(PassResult(copied, mirror.pending.dirty_bytes, time.monotonic() - t0))

    async def _copy_pass(self, mirror: MirrorDevice, throttled: bool = True) -> int:
        """Sweep once over the disk copying every pending block; return bytes copied."""
        pending = mirror.pending
        per_job = max(1, CHUNK_BYTES >> pending.shift)
        copied = 0
        cursor = 0

        def next_job() -> list[tuple[int, int]]:
            """The next pending runs after the cursor: up to CHUNK_BYTES, up to JOB_RUNS runs."""
            nonlocal cursor
            runs: list[tuple[int, int]] = []
            budget = per_job
            while budget and len(runs) < JOB_RUNS:
                run = next(pending.runs(cursor, max_count=budget), None)
                if run is None:
                    cursor = pending.blocks
                    break
                runs.append(run)
                cursor = run[0] + run[1]
                budget -= run[1]
            return runs

        async def worker() -> None:
            nonlocal copied
            while runs := next_job():
                self._check_failure(mirror)
                if throttled:
                    await self.throttle.take(sum(n for _, n in runs) << pending.shift)
                n, zero = await mirror.copy_runs(runs)
                copied += n
                self.progress.copied_bytes += n
                self.progress.zero_bytes += zero

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(WORKERS):
                    tg.create_task(worker())
        except ExceptionGroup as group:
            first = group.exceptions[0]
            while isinstance(first, ExceptionGroup):
                first = first.exceptions[0]
            raise MoveError(f"copying failed: {first}") from group
        self._check_failure(mirror)
        return copied

    @staticmethod
    def _check_failure(mirror: MirrorDevice) -> None:
        if mirror.failure is not None:
            raise MoveError(f"writing the destination failed: {mirror.failure}")

    async def _switch(self, mirror: MirrorDevice) -> None:
        # Most dirty pages go to disk while the guest still writes, so the held part is short.
        await mirror.dest.flush()
        t0 = time.monotonic()
        mirror.hold()
        try:
            while mirror.pending.count:
                await self._copy_pass(mirror, throttled=False)
            crashpoints.reached("move-holding")
            await mirror.dest.flush()
            self._check_failure(mirror)
            self._journal = Journal(self._journal.source, self.dest, "switched")
            self._journal.write()
            crashpoints.reached("move-switched")
            self.tracker.replace_inner(mirror.dest)
            mirror.release("dest")
        finally:
            self.progress.hold_seconds = time.monotonic() - t0
        crashpoints.reached("move-served")

    async def _drop_source(self) -> None:
        mirror = self._mirror
        assert mirror is not None
        # A flush the guest sent before the switch may still be running on the source's fd.
        await mirror.source_drained()
        # Freeing a large file's page cache and blocks takes a while (~0.2 s for 1 GiB on ext4): not in
        # the event loop, where it would stall every client's requests.
        await asyncio.to_thread(self._delete_source)

    def _delete_source(self) -> None:
        self.source.close()
        source = self._journal.source
        source.unlink(missing_ok=True)
        fsync_dir(source.parent)
        self._journal.remove()

    async def _undo(self) -> None:
        """Put the source back under the export and delete the partial copy."""
        mirror = self._mirror
        if mirror is not None:
            if self.tracker.inner is mirror:
                self.tracker.replace_inner(self.source)
            mirror.release("source")
            await mirror.quiesce()
        self._remove_destination(mirror)

    def _remove_destination(self, mirror: MirrorDevice | None) -> None:
        if mirror is not None:
            mirror.dest.close()
        try:
            self.dest.unlink(missing_ok=True)
            fsync_dir(self.dest.parent)
            self._journal.remove()
        except OSError as exc:
            log.error("could not remove the partial copy %s: %s", self.dest, exc)
