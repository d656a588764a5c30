"""When a storage move copies another pass, switches over, or gives up on dirty-block tracking. Pure.

``dbt`` (ESX 4): copy, then re-copy what the guest dirtied meanwhile, pass after pass; switch once what
remains can be copied within the allowed pause (writes are held while the last of it is copied), or fall
back to ``mirror`` when passes stop shrinking. ``mirror`` (ESX 5, QEMU's write-blocking mirror): writes
behind the copy cursor reach both files, so after one pass only what the guest trimmed or zeroed
meanwhile remains; it switches as soon as that fits the pause.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Mode(enum.StrEnum):
    MIRROR = "mirror"
    DBT = "dbt"


class Step(enum.Enum):
    PASS = "pass"  # copy what is pending, once more
    SWITCH = "switch"  # hold writes, copy the rest, switch files
    FALLBACK = "fallback"  # dbt does not converge: go on as a mirror


@dataclass(frozen=True)
class PassResult:
    """What one pass did."""

    copied_bytes: int
    #: Bytes still pending when the pass ended (dirtied behind the cursor, or trimmed).
    remaining_bytes: int
    seconds: float


@dataclass(frozen=True)
class MovePolicy:
    """Knobs of convergence."""

    #: Longest time writes may be held while the remainder is copied at switch-over.
    max_pause: float = 0.1
    #: Remainder always small enough, whatever the measured rate.
    min_switch_bytes: int = 1 << 20
    #: dbt: a pass must cut the remainder to this fraction of the previous one, or passes "stopped
    #: shrinking".
    shrink: float = 0.9
    #: dbt: passes before falling back regardless.
    max_passes: int = 8
    #: mirror: passes before switching regardless (the remainder only comes from trims).
    max_mirror_passes: int = 4

    def switch_bytes(self, rate: float) -> int:
        """The remainder that can be copied within ``max_pause`` at ``rate`` bytes/s."""
        return max(self.min_switch_bytes, int(rate * self.max_pause))

    def next_step(self, mode: Mode, passes: Sequence[PassResult], rate: float) -> Step:
        """Decide after a pass. ``rate``: copy throughput measured so far (bytes/s)."""
        if not passes:
            return Step.PASS
        last = passes[-1]
        if last.remaining_bytes <= self.switch_bytes(rate):
            return Step.SWITCH
        if mode is Mode.MIRROR:
            return Step.SWITCH if len(passes) >= self.max_mirror_passes else Step.PASS
        if len(passes) >= self.max_passes:
            return Step.FALLBACK
        if len(passes) >= 2 and last.remaining_bytes > passes[-2].remaining_bytes * self.shrink:
            return Step.FALLBACK
        return Step.PASS
