"""How each disk of a VM is served on this host: the disk plan (``disks.json`` in the home). Pure.

Every disk of a VM is an export of the VM's one disk service on this host, whatever serves the bytes:

- ``file``: the disk's file in the home, as it is. A VM without a plan has only such disks.
- ``relocating``: the home's file is a cache filled from ``upstream`` (the source's export) on demand
  and in the background (seed 004); once complete the disk service makes it a ``file`` disk and drops
  the cache's bitmap: nothing is left that a later move must know about.
- ``remote``: held by another host (shared storage: the holder keeps the files): every request goes to
  ``upstream``; ``holder`` says whom to tell when the files are no longer needed there.

The migration that moves a VM here writes the plan before the VM's supervisor starts; from then on the
disk service owns it and rewrites it at every change, atomically, so a restart after any crash serves
each disk the way it was last served. ``geometry`` and ``migration`` are facts of the incoming start.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

from hikkoshi.nbd.uri import NbdUri

PLAN_FILE = "disks.json"


class Serving(enum.StrEnum):
    """What serves a disk's bytes."""

    FILE = "file"
    RELOCATING = "relocating"
    REMOTE = "remote"


class Holder(BaseModel):
    """Where a remote disk's files live, to release them once this host no longer needs them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    """The holder host's name (its agent's name; ``local`` for a home reached by path)."""
    agent: str | None = None
    """The holder's agent URL, when it is reached through one."""
    home: str | None = None
    """The holder's VM home, when it is reached by path (one machine, no agents)."""


class DiskServing(BaseModel):
    """How one disk is served."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Serving = Serving.FILE
    upstream: str | None = None
    """``relocating``: the export the cache is filled from; ``remote``: the holder's export."""
    background: Literal["run", "paused"] = "run"
    """``relocating``: whether the background copy runs from the start or waits to be resumed."""
    dirty_bitmap: str | None = None
    """``relocating`` during a migration: the source's dirty bitmap whose blocks are dropped from the
    cache at the switchover (hybrid, postcopy); gone once the VM ran here."""
    bandwidth: str | None = None
    """``relocating``: background copy rate limit (e.g. ``50M``)."""
    holder: Holder | None = None
    """``remote``: who holds the files."""

    @model_validator(mode="after")
    def _check(self) -> DiskServing:
        if self.kind == Serving.FILE:
            if self.upstream is not None or self.holder is not None:
                raise ValueError("a file disk has no upstream and no holder")
            return self
        if self.upstream is None:
            raise ValueError(f"a {self.kind} disk needs its upstream export")
        NbdUri.parse(self.upstream)
        if self.kind == Serving.REMOTE and self.holder is None:
            raise ValueError("a remote disk names its holder")
        return self

    def after_switchover(self) -> DiskServing:
        """The same disk once the VM ran here: a relocation copies on by itself and never again drops
        what the source's bitmap marks (it would drop what the guest wrote here since)."""
        if self.kind != Serving.RELOCATING:
            return self
        return self.model_copy(update={"background": "run", "dirty_bitmap": None})


Geometry = tuple[PositiveInt, PositiveInt, PositiveInt]


class PeerListener(BaseModel):
    """A listener of the disk service for another host (a migration's peer, or the host a VM whose disks
    are held here runs on): bound again as it was after the disk service restarts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str
    """``HOST:PORT`` as bound (never a wildcard address)."""
    peer: str | None = None
    """The host name a client's certificate must name (with TLS)."""
    read_only: bool = False
    tls_dir: str | None = None
    """This host's TLS files (QEMU's layout); ``None``: plain TCP, on a loopback address only."""
    migration: str | None = None
    """The migration it was opened for (closed with it)."""


class DiskPlan(BaseModel):
    """How every disk of one VM is served on this host (disks not named are ``file`` disks)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    disks: dict[str, DiskServing] = {}
    geometry: dict[str, Geometry] = {}
    """Disk name: (cylinders, heads, sectors) of its device on the source, as its guest saw them since
    boot. The destination's device gets the same: QEMU then does not read the disk's first sector to
    guess them while it starts (through a relocation, a wait for the source across the WAN), and cannot
    guess otherwise if the guest changed that sector meanwhile."""
    migration: str | None = None
    """The migration that brought the VM here (for logs)."""
    listeners: tuple[PeerListener, ...] = ()
    """The disk service's listeners for other hosts."""

    def serving(self, disk: str) -> DiskServing:
        """How ``disk`` is served."""
        return self.disks.get(disk, DiskServing())

    def with_disk(self, disk: str, serving: DiskServing) -> DiskPlan:
        """The plan with ``disk`` served as ``serving``."""
        return self.model_copy(update={"disks": {**self.disks, disk: serving}})

    def after_switchover(self) -> DiskPlan:
        """The plan once the VM ran here (see :meth:`DiskServing.after_switchover`)."""
        return self.model_copy(update={"disks": {n: s.after_switchover() for n, s in self.disks.items()}})

    def kinds(self, names: list[str]) -> dict[str, Serving]:
        """The kind of each disk named."""
        return {n: self.serving(n).kind for n in names}

    def with_listeners(self, listeners: tuple[PeerListener, ...]) -> DiskPlan:
        """The plan with these listeners."""
        return self.model_copy(update={"listeners": listeners})

    @property
    def all_files(self) -> bool:
        """Whether every disk is a plain file of the home (then no plan is needed at all)."""
        return all(s.kind == Serving.FILE for s in self.disks.values())
