"""Hybrid storage (ours): the destination's background copy runs while memory is pre-copied (leaving out
what the source's dirty bitmap marks already: it would be dropped anyway); at the switchover the blocks
the guest wrote since are dropped, exactly; the rest is post-copied."""

from __future__ import annotations

from hikkoshi.migrate.storage.relocating import Relocating
from hikkoshi.migrate.storage_modes import StorageMode


class Hybrid(Relocating):
    """See the module's docstring."""

    mode = StorageMode.HYBRID
    start_paused = False
