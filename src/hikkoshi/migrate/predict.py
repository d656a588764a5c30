"""What a live migration will cost, before it runs: total time, downtime, bytes. Pure, stdlib only.

The model replays the migration the way the coordinator runs it:

1. A fixed start (:class:`Calibration`): prechecks and the destination's start (supervisor, disk
   services, QEMU), which run side by side, plus round trips to reach the destination.
2. Storage before memory (``precopy`` only): the disk mirror copies the allocated bytes while the guest's
   writes are mirrored too (they add to the copy and share the link).
3. Memory pre-copy, pass after pass: the first pass sends the guest's memory, each later one what the
   guest dirtied during the one before. After every pass the coordinator's own
   :func:`hikkoshi.migrate.convergence.decide` sees what QEMU would report and steers: it raises the
   downtime limit, throttles the vCPUs (the dirty rate falls by the throttle), switches to post-copy RAM
   or aborts. QEMU switches over as soon as what is left fits the limit at the rate it measured.
   ``hybrid`` shares the link with the disk's background copy while that runs; ``precopy`` with the
   mirrored writes.
4. The switchover: the last memory (at the whole link: the guest is stopped, nothing else is sent)
   plus a fixed cost and round trips. The guest runs on the destination from then on.
5. Storage after the switch (``postcopy``: the whole disk; ``hybrid``: what the background copy had not
   reached, plus the copied blocks the guest wrote again meanwhile), and post-copy RAM's remainder.

Dirtying is linear in time up to the guest's memory (a guest cannot dirty more pages than it has):
``calc-dirty-rate`` measures the rate of distinct pages over its sample, so it is right for short passes
and an overestimate for long ones. The result is honest about the schedule's shape: a dirty rate just
under the stall threshold (``Schedule.shrink`` of the link) can take longer than a higher one that gets
escalated early. :func:`calibrate` fits the fixed costs to migrations that ran.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hikkoshi.migrate.convergence import Observation as Iteration
from hikkoshi.migrate.convergence import Progress, Schedule, build_schedule, decide

_MAX_ROUNDS = 10_000
"""A guard only: the schedule ends every migration long before (stall detection, ``max_seconds``)."""


class Mode(enum.StrEnum):
    """How the disks go along; the values of :class:`hikkoshi.migrate.storage_modes.StorageMode`,
    repeated so that a prediction needs nothing beyond the standard library."""

    SHARED = "shared"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    HYBRID = "hybrid"


class Finish(enum.StrEnum):
    """How the memory copy ends."""

    PRECOPY = "precopy"
    """What was left fitted the downtime limit: QEMU stopped the guest and sent it."""
    POSTCOPY = "postcopy"
    """The schedule switched to post-copy RAM: the destination runs and pulls the rest."""
    ABORT = "abort"
    """The schedule gave up: the migration rolls back, the VM stays where it is."""


@dataclass(frozen=True)
class Link:
    """The path between the two hosts, as measured."""

    bandwidth: float
    """Bytes per second a migration stream gets."""
    rtt_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or self.rtt_ms < 0:
            raise ValueError("a link needs a positive bandwidth and a non-negative RTT")


@dataclass(frozen=True)
class Disk:
    """One disk of the VM."""

    size: int
    allocated: int
    """Bytes a copy must move (holes and zero blocks stay holes)."""

    def __post_init__(self) -> None:
        if self.size < 0 or self.allocated < 0:
            raise ValueError("disk sizes must not be negative")


DEFAULT_SCHEDULE = build_schedule(300)


@dataclass(frozen=True)
class Migration:
    """What is known about a migration before it starts."""

    memory_bytes: int
    """The guest's memory size."""
    dirty_rate: float
    """Bytes per second the guest dirties (``calc-dirty-rate``'s MiB/s x 2**20)."""
    link: Link
    mode: Mode = Mode.SHARED
    disks: tuple[Disk, ...] = ()
    """The disks that move (ignored by ``shared``)."""
    disk_write_rate: float = 0.0
    """Bytes per second the guest writes to those disks."""
    schedule: Schedule = DEFAULT_SCHEDULE
    resident_bytes: int | None = None
    """Memory the first pass sends (QEMU sends a zero page as a header only): the QEMU process's
    resident set, when known; else all of ``memory_bytes``."""

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.dirty_rate < 0 or self.disk_write_rate < 0:
            raise ValueError("memory must be positive, rates non-negative")
        if self.resident_bytes is not None and not 0 <= self.resident_bytes <= self.memory_bytes:
            raise ValueError("resident memory must be between 0 and the memory size")

    @property
    def first_pass_bytes(self) -> int:
        return self.memory_bytes if self.resident_bytes is None else self.resident_bytes

    @property
    def disk_bytes(self) -> int:
        return 0 if self.mode is Mode.SHARED else sum(d.allocated for d in self.disks)


@dataclass(frozen=True)
class Calibration:
    """The fixed costs around the data a migration moves, and how the link is shared.

    The defaults come from ``docs/BENCHMARKS.md`` (live migration: on loopback the guest runs on the
    destination 0.6-0.9 s after the start, across a 150 ms WAN the stream starts after 0.4-1.2 s); fit
    your own with :func:`calibrate`.
    """

    setup_ms: float = 300.0
    """From the request to the first memory byte on the source's side: prechecks, capabilities (the
    dirty-rate sample runs beside the stream)."""
    destination_start_ms: float = 500.0
    """Starting the destination (supervisor, disk services or proxies, QEMU); runs beside
    ``setup_ms``: the stream starts after the longer of the two."""
    start_rtts: float = 2.0
    """Round trips to the destination before the stream can start (its API, the proxies' handshakes)."""
    switchover_ms: float = 20.0
    """Guest stopped, beyond sending the last memory: drain, flush, device state, resume."""
    switchover_rtts: float = 1.0
    """Round trips while the guest is stopped (the last acknowledgement; the proxies' invalidation)."""
    finish_ms: float = 50.0
    """After the last byte: releasing the source, cleanup."""
    mirror_write_share: float = 0.5
    """``precopy``: the most of the link mirrored guest writes take (a write-blocking mirror holds the
    guest's writes to what the link carries)."""
    hybrid_memory_share: float = 0.5
    """``hybrid``: the memory stream's share of the link while the disk's background copy runs."""

    def __post_init__(self) -> None:
        fixed = (self.setup_ms, self.destination_start_ms, self.start_rtts, self.switchover_ms)
        if min(*fixed, self.switchover_rtts, self.finish_ms) < 0:
            raise ValueError("fixed costs must not be negative")
        if not (0 < self.mirror_write_share < 1 and 0 < self.hybrid_memory_share <= 1):
            raise ValueError("link shares must be fractions")

    def stream_start_ms(self, link: Link) -> float:
        """When the first byte can leave, from the request."""
        return max(self.setup_ms, self.destination_start_ms) + self.start_rtts * link.rtt_ms

    def switchover_fixed_ms(self, link: Link) -> float:
        return self.switchover_ms + self.switchover_rtts * link.rtt_ms


DEFAULT_CALIBRATION = Calibration()


@dataclass(frozen=True)
class Prediction:
    """What the migration is expected to do."""

    total_time_ms: float
    """From the request until the source is released (disks post-copied included); for an abort, until
    the schedule gives up."""
    downtime_ms: float
    """The guest stopped: the last memory plus the switchover's fixed costs. 0 for an abort."""
    bytes: int
    """Memory and disk bytes on the link."""
    time_to_destination_ms: float | None
    """When the guest runs on the destination; ``None`` if it never does (abort)."""
    converges: bool
    """Whether the guest ends on the destination (by pre-copy or post-copy RAM)."""
    rounds: int
    """Memory passes before the switchover."""
    finish: Finish
    memory_bytes: int
    disk_bytes: int
    downtime_limit_ms: int
    """The limit in force at the end (the schedule may have raised it)."""
    throttle_percent: int
    explanation: str

    def to_json(self) -> dict[str, object]:
        """``{"total_time_ms", "downtime_ms", "bytes", "time_to_destination_ms", ...}``."""
        return {
            "total_time_ms": round(self.total_time_ms, 1),
            "downtime_ms": round(self.downtime_ms, 1),
            "bytes": self.bytes,
            "time_to_destination_ms": (
                None if self.time_to_destination_ms is None else round(self.time_to_destination_ms, 1)
            ),
            "converges": self.converges,
            "rounds": self.rounds,
            "finish": self.finish.value,
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "downtime_limit_ms": self.downtime_limit_ms,
            "throttle_percent": self.throttle_percent,
            "explanation": self.explanation,
        }


@dataclass
class _Link:
    """The link while memory moves: what the disk copy beside it still has to send. Internal, mutable."""

    total: float
    memory_share: float
    """Of ``total``, while ``disk_left`` > 0."""
    disk_left: float = 0.0
    disk_sent: float = 0.0

    def rate(self) -> float:
        return self.total * self.memory_share if self.disk_left > 0 else self.total

    def send(self, nbytes: float) -> float:
        """Seconds to send ``nbytes`` of memory; the disk copy advances meanwhile."""
        if self.disk_left <= 0 or self.memory_share >= 1:
            return nbytes / self.total
        mem_rate = self.total * self.memory_share
        disk_rate = self.total - mem_rate
        shared_s = nbytes / mem_rate
        disk_s = self.disk_left / disk_rate
        if shared_s <= disk_s:
            self._disk(disk_rate * shared_s)
            return shared_s
        self._disk(self.disk_left)
        return disk_s + (nbytes - mem_rate * disk_s) / self.total

    def _disk(self, nbytes: float) -> None:
        self.disk_left -= nbytes
        self.disk_sent += nbytes


@dataclass(frozen=True)
class _Memory:
    """How the memory copy went."""

    finish: Finish
    seconds: float
    """From the first memory byte to the switchover (or the abort)."""
    sent: float
    left: float
    """At the switchover: sent while stopped (pre-copy) or pulled afterwards (post-copy)."""
    rounds: int
    limit_ms: int
    throttle: int
    steps: tuple[str, ...]


def _memory(m: Migration, link: _Link) -> _Memory:
    """Replay pre-copy against the schedule."""
    sched = m.schedule
    progress = Progress()
    limit_ms, throttle = sched.downtime_ms[0], 0
    remaining, sent, elapsed, rounds = float(m.first_pass_bytes), 0.0, 0.0, 0
    steps: list[str] = []
    while True:
        rate = link.rate()  # what QEMU measures during this pass
        seconds = link.send(remaining)
        sent += remaining
        elapsed += seconds
        rounds += 1
        dirty = m.dirty_rate * (100 - throttle) / 100
        remaining = min(float(m.memory_bytes), dirty * seconds)
        if remaining <= rate * limit_ms / 1000:
            break
        # QEMU's dirty-sync-count is 1 before the first pass ends, so pass N ends at iteration N + 1.
        progress, action = decide(sched, progress, Iteration(rounds + 1, int(remaining), elapsed))
        if action.kind == "set-downtime":
            limit_ms = action.value
            steps.append(f"limit {limit_ms} ms")
        elif action.kind == "throttle":
            throttle = action.value
            steps.append(f"throttle {throttle} %")
        elif action.kind == "postcopy":
            steps.append("post-copy RAM")
            return _Memory(
                Finish.POSTCOPY, elapsed, sent, remaining, rounds, limit_ms, throttle, tuple(steps)
            )
        elif action.kind == "abort":
            steps.append(f"abort ({action.reason})")
            return _Memory(Finish.ABORT, elapsed, sent, remaining, rounds, limit_ms, throttle, tuple(steps))
        if remaining <= rate * limit_ms / 1000:  # a raised limit applies at once
            break
        if rounds >= _MAX_ROUNDS:
            steps.append(f"abort (no end after {rounds} passes)")
            return _Memory(Finish.ABORT, elapsed, sent, remaining, rounds, limit_ms, throttle, tuple(steps))
    return _Memory(Finish.PRECOPY, elapsed, sent, remaining, rounds, limit_ms, throttle, tuple(steps))


def predict(m: Migration, cal: Calibration = DEFAULT_CALIBRATION) -> Prediction:
    """The expected course of migration ``m``."""
    bw = m.link.bandwidth
    start_ms = cal.stream_start_ms(m.link)
    disk = float(m.disk_bytes)
    notes: list[str] = [f"{m.mode.value} over {_rate(bw)}, {m.link.rtt_ms:g} ms RTT"]

    # Storage before memory, and how memory shares the link with it.
    mirror_s, mirror_bytes, writes = 0.0, 0.0, 0.0
    link = _Link(total=bw, memory_share=1.0)
    if m.mode is Mode.PRECOPY:
        writes = min(m.disk_write_rate, cal.mirror_write_share * bw)
        mirror_s = disk / (bw - writes)
        mirror_bytes = disk + writes * mirror_s
        link = _Link(total=bw - writes, memory_share=1.0)
        notes.append(f"mirror {_size(mirror_bytes)} first ({mirror_s:.1f} s)")
    elif m.mode is Mode.HYBRID:
        link = _Link(total=bw, memory_share=cal.hybrid_memory_share, disk_left=disk)

    mem = _memory(m, link)
    mem_start_ms = start_ms + mirror_s * 1000
    mem_end_ms = mem_start_ms + mem.seconds * 1000
    passes = f"{mem.rounds} memory pass{'es' if mem.rounds != 1 else ''}"
    notes.append(passes + (f" ({', '.join(mem.steps)})" if mem.steps else ""))

    if mem.finish is Finish.ABORT:
        total_bytes = int(mirror_bytes + mem.sent + link.disk_sent)
        notes.append("does not converge")
        return Prediction(
            total_time_ms=mem_end_ms,
            downtime_ms=0.0,
            bytes=total_bytes,
            time_to_destination_ms=None,
            converges=False,
            rounds=mem.rounds,
            finish=mem.finish,
            memory_bytes=int(mem.sent),
            disk_bytes=int(mirror_bytes + link.disk_sent),
            downtime_limit_ms=mem.limit_ms,
            throttle_percent=mem.throttle,
            explanation="; ".join(notes),
        )

    # The switchover: the guest is stopped, so the last memory has the whole link.
    fixed_ms = cal.switchover_fixed_ms(m.link)
    if mem.finish is Finish.PRECOPY:
        downtime_ms = mem.left / bw * 1000 + fixed_ms
        memory_after = 0.0
        notes.append(f"switch with {_size(mem.left)} left")
    else:
        downtime_ms = fixed_ms
        memory_after = mem.left
        notes.append(f"{_size(mem.left)} pulled after the switch")
    to_dest_ms = mem_end_ms + downtime_ms

    # Storage after the switch.
    disk_after = 0.0
    if m.mode is Mode.PRECOPY:
        mirror_bytes += writes * (mem.seconds + downtime_ms / 1000)
    elif m.mode is Mode.POSTCOPY:
        disk_after = disk
    elif m.mode is Mode.HYBRID and disk > 0:
        copied = link.disk_sent
        # Writes land uniformly: the share of them on blocks already copied must go again.
        written = min(disk, m.disk_write_rate * mem.seconds)
        again = min(copied, written * copied / disk)
        disk_after = disk - copied + again
        notes.append(f"disk {_size(copied)} copied before the switch, {_size(disk_after)} after")
    after_s = (disk_after + memory_after) / bw
    total_ms = to_dest_ms + after_s * 1000 + cal.finish_ms
    disk_total = mirror_bytes + link.disk_sent + disk_after
    notes.append(f"downtime {downtime_ms:.0f} ms, on the destination at {to_dest_ms / 1000:.1f} s")
    return Prediction(
        total_time_ms=total_ms,
        downtime_ms=downtime_ms,
        bytes=int(mem.sent + memory_after + disk_total),
        time_to_destination_ms=to_dest_ms,
        converges=True,
        rounds=mem.rounds,
        finish=mem.finish,
        memory_bytes=int(mem.sent + memory_after),
        disk_bytes=int(disk_total),
        downtime_limit_ms=mem.limit_ms,
        throttle_percent=mem.throttle,
        explanation="; ".join(notes),
    )


COLD_CALLS = 12
"""Round trips of an offline migration besides the copy (precheck, home files, export, commit, cleanup)."""


def predict_cold(allocated: int, link: Link) -> Prediction:
    """A powered-off VM moved to another host (an offline migration): its home files and its disks'
    allocated bytes pulled once over ``link``; no guest runs, so nothing is dirtied and nothing stops."""
    if allocated < 0:
        raise ValueError("a disk size is non-negative")
    seconds = allocated / link.bandwidth + COLD_CALLS * link.rtt_ms / 1000
    return _disk_only(
        seconds,
        allocated,
        f"powered off: {_size(allocated)} of disk copied at {_rate(link.bandwidth)}: {seconds:.1f} s",
    )


def predict_disk_move(allocated: int, write_rate: float, bandwidth: float) -> Prediction:
    """A disk moved to another datastore of the same host (``storage-migrate``, mirror mode): one pass
    while the guest's writes behind the cursor go to both files; no memory moves, the guest never stops
    beyond the switch between two requests."""
    if bandwidth <= 0 or allocated < 0 or write_rate < 0:
        raise ValueError("a disk move needs a positive bandwidth and non-negative sizes")
    # Writes take at most half the copy's throughput (the mirror's own writes hold the guest's).
    writes = min(write_rate, bandwidth / 2)
    seconds = allocated / (bandwidth - writes)
    nbytes = int(allocated + writes * seconds)
    return _disk_only(
        seconds, nbytes, f"disk mirror of {_size(allocated)} at {_rate(bandwidth)}: {seconds:.1f} s"
    )


def _disk_only(seconds: float, nbytes: int, explanation: str) -> Prediction:
    """A move of disk data alone: no memory, no pause of the guest, done when the copy is."""
    return Prediction(
        total_time_ms=seconds * 1000,
        downtime_ms=0.0,
        bytes=nbytes,
        time_to_destination_ms=seconds * 1000,
        converges=True,
        rounds=0,
        finish=Finish.PRECOPY,
        memory_bytes=0,
        disk_bytes=nbytes,
        downtime_limit_ms=0,
        throttle_percent=0,
        explanation=explanation,
    )


# --- calibration -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """A migration that ran: what was known before, and what its report says."""

    migration: Migration
    total_time_ms: float
    """The report's ``elapsed_s`` x 1000."""
    downtime_ms: float
    """The report's ``downtime_ms`` (QEMU's own)."""
    time_to_destination_ms: float
    """The report's ``time_to_destination_s`` x 1000."""
    stream_start_ms: float | None = None
    """The report's ``memory_started`` x 1000 (when the first memory byte left), if recorded."""
    destination_start_ms: float | None = None
    """The record's ``prepare-destination`` phase, in ms, if recorded."""


def calibrate(observations: Sequence[Observed], base: Calibration = DEFAULT_CALIBRATION) -> Calibration:
    """Fixed costs fitted to migrations that ran; the link shares stay ``base``'s.

    How: each constant is what the model leaves unexplained, fitted in the order the costs happen.
    (1) The switchover: observed downtime minus the predicted last-memory time, as ``ms + rtts x RTT``
    by least squares (the RTT term only when the runs had different RTTs; else ``base``'s count stays).
    (2) The destination's start, from the recorded ``prepare-destination`` phases, the same way (its
    round trips are the stream's). (3) The stream's start: recorded, or the observed time to the
    destination minus the predicted storage, memory and switchover time; fitted the same way when (2)
    had no data. Its fixed part is ``max(setup, destination start)``, so setup takes it unless the
    destination's start was the longer. (4) ``finish_ms``: the median of
    what the total leaves over. Fits are clamped at zero; runs that did not converge are skipped.
    With no usable runs, ``base`` comes back unchanged.
    """
    runs = [o for o in observations if predict(o.migration, base).converges]
    if not runs:
        return base
    zero = replace(base, switchover_ms=0.0, switchover_rtts=0.0)
    rtts = [o.migration.link.rtt_ms for o in runs]

    resid = [o.downtime_ms - predict(o.migration, zero).downtime_ms for o in runs]
    sw_ms, sw_rtts = _line(rtts, resid, base.switchover_rtts)
    cal = replace(base, switchover_ms=sw_ms, switchover_rtts=sw_rtts)

    dest = [
        (o.migration.link.rtt_ms, o.destination_start_ms) for o in runs if o.destination_start_ms is not None
    ]
    if dest:
        d_ms, d_rtts = _line([r for r, _ in dest], [v for _, v in dest], base.start_rtts)
        cal = replace(cal, destination_start_ms=d_ms, start_rtts=d_rtts)

    starts = []
    for o in runs:
        start = o.stream_start_ms
        if start is None:
            p = predict(o.migration, cal)
            assert p.time_to_destination_ms is not None
            start = o.time_to_destination_ms - (
                p.time_to_destination_ms - cal.stream_start_ms(o.migration.link)
            )
        starts.append(start)
    if dest:  # the round trips are the destination's: fitted above
        fixed = max(0.0, statistics.median(s - cal.start_rtts * r for r, s in zip(rtts, starts, strict=True)))
    else:
        fixed, start_rtts = _line(rtts, starts, cal.start_rtts)
        cal = replace(cal, start_rtts=start_rtts)
    if fixed >= cal.destination_start_ms:
        cal = replace(cal, setup_ms=fixed)
    else:  # the destination's start was the longer: setup ran beside it and took no more
        cal = replace(cal, setup_ms=min(cal.setup_ms, fixed), destination_start_ms=fixed)

    finish = [o.total_time_ms - (predict(o.migration, cal).total_time_ms - cal.finish_ms) for o in runs]
    return replace(cal, finish_ms=max(0.0, statistics.median(finish)))


def _line(xs: Sequence[float], ys: Sequence[float], slope: float) -> tuple[float, float]:
    """``ys ~ a + b x``, least squares, both clamped at 0; with all ``x`` alike only ``a`` is fitted, as
    the median (one run slowed by something else, a cold cache or a busy host, must not move it)."""
    if max(xs) - min(xs) < 0.1:  # RTTs within 0.1 ms of each other say nothing about the slope
        a = statistics.median(y - slope * x for x, y in zip(xs, ys, strict=True))
        return max(0.0, a), slope
    b, a = statistics.linear_regression(xs, ys)
    if b < 0:
        return max(0.0, statistics.fmean(ys)), 0.0
    return max(0.0, a), b


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _rate(bps: float) -> str:
    return f"{bps * 8 / 1e9:.2f} Gbit/s" if bps * 8 >= 1e9 else f"{bps * 8 / 1e6:.0f} Mbit/s"
