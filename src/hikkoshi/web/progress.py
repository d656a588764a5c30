"""A migration's state for people: one word, an overall percentage that never runs backwards, and the
time left. Pure.

The percentage weighs the forward phases by how long they usually take and, inside a phase that moves
bytes, by how many of them went (memory sent of memory to send; disk bytes present of the disks). A
pre-copy pass re-sends pages the guest dirtied, so ``sent / (sent + remaining)`` can fall between two
samples: :class:`Ratchet` keeps the highest value shown, so a bar never goes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hikkoshi.migrate.phases import FORWARD, Phase

#: Relative weight of each forward phase in the overall bar (memory and storage move the bytes).
WEIGHTS: dict[Phase, float] = {
    Phase.PRECHECK: 2,
    Phase.PREPARE: 6,
    Phase.HOME_FILES: 2,
    Phase.STORAGE_PRE: 15,
    Phase.MEMORY: 40,
    Phase.SWITCHOVER: 5,
    Phase.RESUME: 3,
    Phase.ANNOUNCE: 1,
    Phase.STORAGE_POST: 20,
    Phase.CLEANUP: 6,
}
_TOTAL = sum(WEIGHTS.values())

#: Every word :func:`state_word` says.
STATES = ("queued", "running", "rolling back", "done", "failed", "rolled back")


def state_word(phase: str, running: bool, queued: bool = False) -> str:
    """The migration's state in one word (see :data:`STATES`). A migration that is neither running
    nor ended waits (for a cluster slot, or for its agent to take it up again): ``queued``."""
    if phase == Phase.DONE:
        return "done"
    if phase == Phase.ROLLED_BACK:
        return "rolled back"
    if phase == Phase.FAILED:
        return "failed"
    if phase == Phase.ROLLBACK:
        return "rolling back"
    if queued or not running:
        return "queued"
    return "running"


def _within(phase: Phase, progress: Mapping[str, Any]) -> float:
    """How far the current phase is, 0..1, from its bytes (0 when it moves none we can count)."""
    if progress.get("phase") != phase.value:
        return 0.0
    if phase == Phase.MEMORY:
        done, left = progress.get("memory_done"), progress.get("memory_remaining")
        if isinstance(done, int | float) and isinstance(left, int | float) and done + left > 0:
            return float(done / (done + left))
    if phase in (Phase.STORAGE_PRE, Phase.STORAGE_POST):
        done, total = progress.get("disk_done"), progress.get("disk_total")
        if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
            return float(min(done / total, 1.0))
    return 0.0


def percent(phase: str, progress: Mapping[str, Any]) -> float:
    """The overall progress of a migration at ``phase`` with its latest ``progress``, 0..100."""
    if phase == Phase.DONE:
        return 100.0
    try:
        current = Phase(phase)
    except ValueError:
        return 0.0
    if current not in WEIGHTS:
        return 0.0  # rolling back, rolled back, failed: the bar stays where it was (the ratchet)
    before = sum(WEIGHTS[p] for p in FORWARD[: FORWARD.index(current)])
    return round(100.0 * (before + WEIGHTS[current] * _within(current, progress)) / _TOTAL, 1)


@dataclass
class Ratchet:
    """The highest value shown so far, per key: what a bar shows never goes back."""

    shown: dict[str, float] = field(default_factory=dict)

    def __call__(self, key: str, value: float) -> float:
        best = max(self.shown.get(key, value), value)
        self.shown[key] = best
        return best


@dataclass
class Eta:
    """Seconds left for what moves bytes now, from the rate seen between samples (smoothed)."""

    alpha: float = 0.3
    _last: tuple[str, float, float] | None = None
    _rate: float | None = None

    def update(self, what: str, t: float, done: float, left: float) -> float | None:
        """A sample: ``done`` bytes of ``what`` at ``t`` seconds, ``left`` to go; seconds left, if known."""
        if self._last is not None and self._last[0] == what and t > self._last[1]:
            rate = (done - self._last[2]) / (t - self._last[1])
            if rate > 0:
                self._rate = rate if self._rate is None else self.alpha * rate + (1 - self.alpha) * self._rate
        elif self._last is None or self._last[0] != what:
            self._rate = None
        self._last = (what, t, done)
        if left <= 0:
            return 0.0
        return round(left / self._rate, 1) if self._rate else None


def moving(progress: Mapping[str, Any]) -> tuple[str, float, float] | None:
    """What the migration moves now, from its latest progress: (``memory`` or ``disk``, done, left)."""
    phase = progress.get("phase")
    if phase == Phase.MEMORY.value:
        done, left = progress.get("memory_done"), progress.get("memory_remaining")
        if isinstance(done, int | float) and isinstance(left, int | float):
            return "memory", float(done), float(left)
    if phase in (Phase.STORAGE_PRE.value, Phase.STORAGE_POST.value):
        done, total = progress.get("disk_done"), progress.get("disk_total")
        if isinstance(done, int | float) and isinstance(total, int | float):
            return "disk", float(done), float(total - done)
    return None
