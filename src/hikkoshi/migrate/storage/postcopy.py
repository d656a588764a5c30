"""Postcopy storage: memory moves first; the destination relocates the disks after the switchover
(anything QEMU read before it, e.g. while waiting for the stream, is reconciled by the invalidation)."""

from __future__ import annotations

from hikkoshi.migrate.storage.relocating import Relocating
from hikkoshi.migrate.storage_modes import StorageMode


class Postcopy(Relocating):
    """See the module's docstring."""

    mode = StorageMode.POSTCOPY
    start_paused = True
