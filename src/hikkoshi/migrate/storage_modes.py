"""The four ways a migration's disks go along, as names. Pure. (What each does: :mod:`storage`.)

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


class StorageMode(enum.StrEnum):
    """How the disks move."""

    SHARED = "shared"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    HYBRID = "hybrid"


def bitmap_name(migration: str) -> str:
    """The source's dirty bitmap of a hybrid or postcopy migration."""
    return f"migrate-{migration}"
