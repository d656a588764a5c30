"""A migration's timeline as data: the samples its job took (progress, the destination cache's fill,
the guest's disk I/O latency), for the dashboard and scripts. The PNG (``timeline.py``) draws the same.

A running job keeps its samples in memory and writes them to the database when it ends; a job taken
over after a restart adds its own. The answer is the database's samples, then the memory's: in the
order they were taken, so that ``offset`` lets a reader fetch only what is new. An unknown migration
is :class:`~hikkoshi.agent.errors.NotFound` (404).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from hikkoshi.agent.jobs import Jobs


class Sample(BaseModel):
    """One point of a migration's timeline; a sample carries only some of the figures."""

    model_config = ConfigDict(extra="ignore")

    t: float
    """Seconds since the job started."""
    phase: str | None = None
    elapsed: float | None = None
    memory_done: int | None = None
    """Memory bytes sent so far."""
    memory_remaining: int | None = None
    memory_total: int | None = None
    iteration: int | None = None
    """QEMU's dirty-sync count: pre-copy pass ``iteration - 1`` is under way."""
    dirty_pages_rate: float | None = None
    """Pages (4 KiB) the guest dirties per second."""
    mbps: float | None = None
    disk: str | None = None
    disk_done: int | None = None
    """Bytes of the disks present at the destination (or copied, for a mirror)."""
    disk_total: int | None = None
    disk_demand: int | None = None
    """Bytes the destination fetched because the guest read them (relocations)."""
    disk_background: int | None = None
    """Bytes the destination's background copy fetched (relocations)."""
    io_latency_ms: float | None = None
    """The mean latency of the guest's disk requests over the last half second."""
    io_at: str | None = None
    """Where those requests were served: ``source`` or ``destination``."""


class MigrationSamples(BaseModel):
    """``GET /v1/migrations/{id}/samples``."""

    id: str
    running: bool
    offset: int
    """The index of the first sample in ``samples``."""
    total: int
    """How many samples there are in all (ask again with ``offset=total`` for new ones)."""
    samples: list[Sample]


def migration_samples(jobs: Jobs, migration_id: str, offset: int = 0) -> MigrationSamples:
    """The samples of a migration this agent ran, from ``offset`` on; :class:`NotFound` if unknown."""
    info = jobs.info(migration_id)  # NotFound if the agent never ran it
    state = jobs.jobs.get(migration_id)
    points = jobs.db.samples(migration_id) + (list(state.samples) if state is not None else [])
    return MigrationSamples(
        id=migration_id,
        running=info.running,
        offset=min(offset, len(points)),
        total=len(points),
        samples=[Sample.model_validate({**data, "t": t}) for t, data in points[offset:]],
    )
