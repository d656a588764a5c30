"""The phases of a migration, in order, and the rules between them. Pure.

A migration moves forward only: precheck -> prepare destination -> home files -> storage pre-phase ->
memory pre-copy -> switchover -> resume on destination -> announce -> storage post-phase -> cleanup ->
done. Before ``resume`` any failure leads to ``rollback`` (the VM keeps or resumes running on the
source; the destination's leftovers are removed) and ends ``rolled-back``. ``resume`` is the commit
point: it is recorded *before* the destination is told to run, so from then on nobody may resume
the source, whatever crashed; the migration can only be finished forward (or end ``failed``, for a
person to look at).
"""

from __future__ import annotations

import enum
from typing import Literal


class Phase(enum.StrEnum):
    """Where a migration stands."""

    PRECHECK = "precheck"
    PREPARE = "prepare-destination"
    HOME_FILES = "home-files"
    STORAGE_PRE = "storage-pre"
    MEMORY = "memory-precopy"
    SWITCHOVER = "switchover"
    RESUME = "resume-destination"
    ANNOUNCE = "announce"
    STORAGE_POST = "storage-post"
    CLEANUP = "cleanup"
    DONE = "done"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


FORWARD: tuple[Phase, ...] = (
    Phase.PRECHECK,
    Phase.PREPARE,
    Phase.HOME_FILES,
    Phase.STORAGE_PRE,
    Phase.MEMORY,
    Phase.SWITCHOVER,
    Phase.RESUME,
    Phase.ANNOUNCE,
    Phase.STORAGE_POST,
    Phase.CLEANUP,
    Phase.DONE,
)
"""The phases of a migration that succeeds, in order."""

FINAL = frozenset({Phase.DONE, Phase.ROLLED_BACK, Phase.FAILED})


class PhaseError(Exception):
    """A transition the rules forbid."""


def committed(phase: Phase) -> bool:
    """Whether the destination may have run: from ``resume`` on the source must never run again."""
    return (phase in FORWARD and FORWARD.index(phase) >= FORWARD.index(Phase.RESUME)) or phase == Phase.FAILED


def can_move(current: Phase, target: Phase) -> bool:
    """Whether ``current -> target`` is allowed."""
    if current in FINAL:
        return False
    if target == Phase.ROLLBACK:
        return not committed(current) and current != Phase.ROLLBACK
    if target == Phase.ROLLED_BACK:
        return current == Phase.ROLLBACK
    if target == Phase.FAILED:
        return True  # the last word when neither forward nor back can be completed
    if current == Phase.ROLLBACK or target not in FORWARD:
        return False
    return FORWARD.index(target) > FORWARD.index(current)


def move(current: Phase, target: Phase) -> Phase:
    """``target``, if the rules allow going there from ``current``; else :class:`PhaseError`."""
    if not can_move(current, target):
        raise PhaseError(f"a migration cannot go from {current} to {target}")
    return target


Recovery = Literal["nothing", "rollback", "finish", "inspect"]


def recovery(phase: Phase) -> Recovery:
    """What a restarted coordinator does with a migration last recorded at ``phase``.

    Before the commit point it rolls back; after it, it finishes forward; a migration that was rolling
    back finishes the rollback; a final one needs nothing. ``inspect``: ``failed`` migrations are left
    to a person (their record says why).
    """
    if phase in (Phase.DONE, Phase.ROLLED_BACK):
        return "nothing"
    if phase == Phase.FAILED:
        return "inspect"
    if phase == Phase.ROLLBACK or not committed(phase):
        return "rollback"
    return "finish"
