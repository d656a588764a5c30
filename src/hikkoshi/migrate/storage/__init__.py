"""Storage modes of a migration, one object each (see :mod:`base`)."""

from __future__ import annotations

from hikkoshi.migrate.storage.base import MoveContext, Route, StorageStrategy
from hikkoshi.migrate.storage.hybrid import Hybrid
from hikkoshi.migrate.storage.postcopy import Postcopy
from hikkoshi.migrate.storage.precopy import Precopy
from hikkoshi.migrate.storage.shared import Shared
from hikkoshi.migrate.storage.take_back import TakeBack
from hikkoshi.migrate.storage_modes import StorageMode

_BY_MODE: dict[StorageMode, type[StorageStrategy]] = {
    StorageMode.SHARED: Shared,
    StorageMode.PRECOPY: Precopy,
    StorageMode.POSTCOPY: Postcopy,
    StorageMode.HYBRID: Hybrid,
}


def strategy(mode: StorageMode, *, takes_back: bool = False) -> StorageStrategy:
    """The strategy of ``mode``; a VM coming home to its disks' holder moves no disk whatever the mode."""
    if takes_back:
        return TakeBack(mode)
    return _BY_MODE[mode]()


__all__ = ["MoveContext", "Route", "StorageStrategy", "strategy"]
