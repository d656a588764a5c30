"""A dashboard source with canned hosts, VMs and migrations, recording the actions asked of it: for
testing the dashboard's pages, login and events without agents."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hikkoshi.web.source import Capabilities, NotAvailable, SourceError
from hikkoshi.web.views import (
    DatastoreView,
    DiskView,
    HostView,
    MigrationView,
    Overview,
    Recommendation,
    VmView,
)

T0 = 1_700_000_000.0


def finished_migration(mid: str = "abc123") -> MigrationView:
    """A hybrid live migration that ended ``done``, with phases and a report."""
    names = ["precheck", "prepare-destination", "home-files", "storage-pre", "memory-precopy", "switchover",
             "resume-destination", "announce", "storage-post", "cleanup", "done"]  # fmt: skip
    phases = [
        {"phase": p, "started": T0 + i, "seconds": 1.0 if p != "done" else 0.0} for i, p in enumerate(names)
    ]
    report = {
        "downtime_ms": 40,
        "elapsed_s": 10.0,
        "time_to_destination_s": 6.5,
        "memory_bytes": 100 << 20,
        "memory_iterations": 3,
        "switchover": {"stopped_at": 5.0, "gap_ms": 80.0},
        "disk_fetch": {"disk0": {"demand_bytes": 1 << 20, "background_bytes": 7 << 20, "zero_bytes": 0}},
        "phases_s": {p: 1.0 for p in names[:-1]},
    }
    return MigrationView(
        id=mid, host="alpha", vm="web", kind="live", storage="hybrid", phase="done", state="done",
        running=False, created=T0, finished=T0 + 10, destination="beta",
        progress={"phase": "done"}, report=report, record={"phases": phases},
    )  # fmt: skip


def samples() -> list[dict[str, Any]]:
    """A few samples of the migration above: two memory passes, the cache filling, latencies."""
    return [
        {"t": 4.1, "phase": "memory-precopy", "memory_done": 40 << 20, "memory_remaining": 60 << 20,
         "iteration": 1, "dirty_pages_rate": 256},
        {"t": 4.6, "phase": "memory-precopy", "memory_done": 90 << 20, "memory_remaining": 10 << 20,
         "iteration": 2, "dirty_pages_rate": 512},
        {"t": 4.7, "disk_done": 1 << 20, "disk_total": 8 << 20, "disk_demand": 0, "disk_background": 1 << 20},
        {"t": 4.8, "io_latency_ms": 0.5, "io_at": "source"},
        {"t": 6.9, "io_latency_ms": 0.7, "io_at": "destination"},
    ]  # fmt: skip


@dataclass
class FakeSource:
    """See the module."""

    kind: str = "agents"
    capabilities: Capabilities = field(
        default_factory=lambda: Capabilities(maintenance=True, drs=False, drs_note="no DRS here")
    )
    migrations: list[MigrationView] = field(default_factory=lambda: [finished_migration()])
    actions: list[tuple[Any, ...]] = field(default_factory=list)
    closed: bool = False

    async def overview(self) -> Overview:
        hosts = [
            HostView(name=n, url=f"http://127.0.0.1:{p}", state="up", memory_total=8 << 30,
                     memory_available=6 << 30, cpu_count=4, load_average=[0.5, 0.4, 0.3], vms=1,
                     datastores=[DatastoreView(name="main", total_bytes=100 << 30, free_bytes=60 << 30)])
            for n, p in (("alpha", 1), ("beta", 2))
        ]  # fmt: skip
        vms = [
            VmView(name="web", host="alpha", state="running", memory_mib=256, cpus=1,
                   disks=[DiskView(name="disk0", size=64 << 20, provisioning="thin")], owner="alpha"),
        ]  # fmt: skip
        return Overview(hosts=hosts, vms=vms, migrations=self.migrations)

    async def migration(self, migration_id: str) -> MigrationView:
        for m in self.migrations:
            if m.id == migration_id:
                return m
        raise SourceError(404, f"no agent knows migration {migration_id}")

    async def samples(self, migration_id: str, offset: int) -> tuple[list[dict[str, Any]], int]:
        await self.migration(migration_id)
        all_ = samples()
        return all_[offset:], len(all_)

    async def migrate(self, vm: str, host: str, destination: str, storage: str) -> str:
        self.actions.append(("migrate", vm, host, destination, storage))
        if destination == "nowhere":
            raise SourceError(424, "destination agent nowhere: does not answer")
        mid = "def456"
        self.migrations.append(
            finished_migration(mid).model_copy(
                update={
                    "phase": "memory-precopy",
                    "state": "running",
                    "running": True,
                    "created": time.time(),
                }
            )
        )
        return mid

    async def cancel(self, migration_id: str) -> None:
        self.actions.append(("cancel", migration_id))

    async def set_maintenance(self, host: str, on: bool, reason: str = "") -> None:
        self.actions.append(("maintenance", host, on))

    async def recommendations(self) -> list[Recommendation]:
        raise NotAvailable("no DRS here")

    async def apply(self, recommendation_id: str) -> str:
        raise NotAvailable("no DRS here")

    async def aclose(self) -> None:
        self.closed = True
