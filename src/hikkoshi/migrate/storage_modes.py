"""The four ways a migration's disks go along, as data. Pure.

- ``shared``: the destination QEMU opens the source host's export; only memory moves.
- ``precopy``: the disks are mirrored to the destination (QEMU's write-blocking drive-mirror into
  the destination's NBD export) until in sync, then memory moves; libvirt's way.
- ``postcopy``: memory moves first; the destination serves the disks through the relocation proxy,
  which fetches what the guest reads and copies the rest in the background after the switchover
  (anything read before it, e.g. by QEMU while waiting for the stream, is reconciled as in hybrid).
- ``hybrid``: the proxy's background copy runs while memory is pre-copied; at the switchover (the
  source stopped, drained and flushed) the blocks the guest wrote since the copy began are dropped
  from the destination's cache, exactly, through the source's dirty bitmap; the rest is post-copied.
"""

from __future__ import annotations

import enum

from hikkoshi.vm.disk_plan import DiskBackend


class StorageMode(enum.StrEnum):
    """How the disks move."""

    SHARED = "shared"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    HYBRID = "hybrid"


def bitmap_name(migration: str) -> str:
    """The source's dirty bitmap of a hybrid migration."""
    return f"migrate-{migration}"


def destination_backend(
    mode: StorageMode, export_uri: str, migration: str, bandwidth: str | None = None
) -> DiskBackend:
    """How the destination provides a disk whose source export is at ``export_uri``."""
    if mode == StorageMode.SHARED:
        return DiskBackend(kind="remote", uri=export_uri)
    if mode == StorageMode.PRECOPY:
        return DiskBackend(kind="local")
    if mode == StorageMode.POSTCOPY:
        # Paused: nothing is copied before the switchover. QEMU may still read a block or two while
        # it waits for the stream (and the proxy must answer): the bitmap reconciles those too.
        return DiskBackend(
            kind="proxy",
            uri=export_uri,
            background="paused",
            dirty_bitmap=bitmap_name(migration),
            bandwidth=bandwidth,
        )
    return DiskBackend(
        kind="proxy",
        uri=export_uri,
        background="run",
        dirty_bitmap=bitmap_name(migration),
        bandwidth=bandwidth,
    )


def uses_dirty_bitmap(mode: StorageMode) -> bool:
    """Whether the destination's proxies drop what the source changed, at the switchover."""
    return mode in (StorageMode.POSTCOPY, StorageMode.HYBRID)


def moves_disks(mode: StorageMode) -> bool:
    """Whether the destination ends with its own copy (and the source's disks are deleted)."""
    return mode != StorageMode.SHARED


def source_serves_after_switchover(mode: StorageMode) -> bool:
    """Whether the destination still reads from the source after it resumed."""
    return mode in (StorageMode.SHARED, StorageMode.POSTCOPY, StorageMode.HYBRID)
