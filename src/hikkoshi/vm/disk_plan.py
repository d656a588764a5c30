"""Where each disk of an incoming VM comes from: ``incoming.json`` in the destination's home.

A VM started normally serves every disk from its home with ``hikkoshi nbd serve``. A VM started as
the destination of a migration (``supervisor --incoming``) may instead get a disk

- ``local``: served from the home as usual (the file is already there, or a mirror fills it);
- ``proxy``: served by a relocation proxy (``hikkoshi nbd proxy``) whose cache is the disk's file in
  the home, pulling from the source's export: postcopy and hybrid storage;
- ``remote``: opened by QEMU directly at the source's export (shared storage); nothing local.

The plan is written by the migration coordinator before it starts the destination supervisor, and stays
as long as a disk is not a complete local file: a VM started again later (after a crash in the middle of
the post-copy) still gets its disks from the proxies, which carry on where they stood, or from the
remote export. A proxy whose cache is complete does not need its upstream any more.

The plan is data (pure); :class:`~hikkoshi.vm.home.VmHome` writes and reads it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

from hikkoshi.nbd.uri import NbdUri

PLAN_FILE = "incoming.json"


class DiskBackend(BaseModel):
    """How one disk is provided on the destination."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["local", "proxy", "remote"] = "local"
    uri: str | None = None
    """``proxy``: the upstream export; ``remote``: the export QEMU opens."""
    background: Literal["run", "paused"] = "run"
    """``proxy``: whether the background copy starts at once or waits for ``resume``."""
    dirty_bitmap: str | None = None
    """``proxy``: the source's dirty bitmap to invalidate from at switchover (hybrid)."""
    bandwidth: str | None = None
    """``proxy``: background copy rate limit (e.g. ``50M``)."""

    @model_validator(mode="after")
    def _check(self) -> DiskBackend:
        if self.kind == "local":
            if self.uri is not None:
                raise ValueError("a local disk has no uri")
        else:
            if self.uri is None:
                raise ValueError(f"a {self.kind} disk needs the export's uri")
            NbdUri.parse(self.uri)
        return self


class IncomingPlan(BaseModel):
    """A destination VM: the disks' backends (disks not named are ``local``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    migration: str
    """The migration's id (for logs)."""
    disks: dict[str, DiskBackend] = {}
    geometry: dict[str, tuple[PositiveInt, PositiveInt, PositiveInt]] = {}
    """Disk name: (cylinders, heads, sectors) of its device on the source, as its guest saw them since
    boot. The destination's device gets the same: QEMU then does not read the disk's first sector to
    guess them while it starts (through a proxy, a wait for the source across the WAN), and cannot guess
    otherwise if the guest changed that sector meanwhile."""

    def backend(self, disk: str) -> DiskBackend:
        """The backend of one disk."""
        return self.disks.get(disk, DiskBackend())

    def resumed(self) -> IncomingPlan:
        """The plan for starting the VM again after the migration's switchover: proxies just copy
        on (no waiting to be resumed; never again an invalidation from the source's bitmap)."""
        disks = {
            name: b.model_copy(update={"background": "run", "dirty_bitmap": None}) if b.kind == "proxy" else b
            for name, b in self.disks.items()
        }
        return self.model_copy(update={"disks": disks})
