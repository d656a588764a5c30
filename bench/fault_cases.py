"""The fault campaign's cases: at which phase of a migration, in which storage mode, which fault. Pure.

A case holds a live migration (or a quick one) from host A to host B at the entry of a phase (the jobs'
pause hook), injects one fault there, and lets the migration go on into it:

- ``kill-src-agent``, ``kill-dst-agent``: SIGKILL of that host's agent (started again on its state dir);
- ``kill-src-qemu``, ``kill-dst-qemu``: SIGKILL of the VM's QEMU on that host (the VM is started again
  with ``vm start`` where the migration's record says it is, once the record says so);
- ``kill-src-disks``, ``kill-dst-disks``: SIGKILL of the VM's disk service on that host (its supervisor
  starts it again; nothing is done by hand);
- ``cut-5s``: B's link blackholed for 5 s; ``cut``: for good (held past every deadline, then brought
  back once where the VM runs was recorded: after the commit in postcopy and hybrid, part of the disk's
  data is only on A, so the migration cannot finish until the link comes back);
- ``reset``: every TCP connection between A and B reset at once (the link stays up).

A fault on a process that does not exist at that phase (B's QEMU and disk service start at the end of
``home-files``; A's QEMU quits in ``storage-post``) is no case. :func:`choose` picks cases from a seed:
first one per (phase, fault) pair that has any, its mode cycling through a shuffled list, then more at
random, so that any run of 74 cases or more puts every fault at every phase.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PHASES = (
    "precheck",
    "prepare-destination",
    "home-files",
    "storage-pre",
    "memory-precopy",
    "switchover",
    "resume-destination",
    "storage-post",
    "cleanup",
)
MODES = ("shared", "precopy", "postcopy", "hybrid", "quick")
"""Storage modes; ``quick``: a quick migration (the guest paused while it moves; storage hybrid)."""
FAULTS = (
    "kill-src-agent",
    "kill-dst-agent",
    "kill-src-qemu",
    "kill-dst-qemu",
    "kill-src-disks",
    "kill-dst-disks",
    "cut-5s",
    "cut",
    "reset",
)
#: From the commit on (the destination may run): the source never runs again.
COMMITTED_PHASES = frozenset({"resume-destination", "storage-post", "cleanup"})


@dataclass(frozen=True)
class Case:
    """One case of the campaign."""

    number: int
    mode: str
    phase: str
    fault: str

    @property
    def storage(self) -> str:
        return "hybrid" if self.mode == "quick" else self.mode

    @property
    def kind(self) -> str:
        return "quick" if self.mode == "quick" else "live"

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.phase}/{self.fault}"


def applicable(phase: str, fault: str) -> bool:
    """Whether the fault has something to hit at the phase's entry."""
    at = PHASES.index(phase)
    if fault in ("kill-dst-qemu", "kill-dst-disks"):
        return at >= PHASES.index("storage-pre")  # the incoming supervisor starts in home-files
    if fault == "kill-src-qemu":
        return at <= PHASES.index("storage-post")  # it quits in storage-post (the hand-off)
    return True


def every_case() -> list[tuple[str, str, str]]:
    """Every (mode, phase, fault) that is a case."""
    return [(m, p, f) for p in PHASES for f in FAULTS if applicable(p, f) for m in MODES]


def choose(seed: int, count: int) -> list[Case]:
    """``count`` cases from ``seed`` (all of them for 0 or more than there are; see the module)."""
    rng = random.Random(seed)
    everything = every_case()
    if count <= 0 or count >= len(everything):
        picked = list(everything)
        rng.shuffle(picked)
    else:
        modes: list[str] = []
        picked = []
        pairs = [(p, f) for p in PHASES for f in FAULTS if applicable(p, f)]
        rng.shuffle(pairs)
        for phase, fault in pairs:
            if not modes:
                modes = list(MODES)
                rng.shuffle(modes)
            picked.append((modes.pop(), phase, fault))
        rest = [c for c in everything if c not in picked]
        rng.shuffle(rest)
        picked = (picked + rest)[:count]
    return [Case(i + 1, m, p, f) for i, (m, p, f) in enumerate(picked)]


REPRESENTATIVE = (
    ("hybrid", "memory-precopy", "kill-src-agent"),
    ("postcopy", "storage-post", "kill-src-agent"),
    ("shared", "memory-precopy", "kill-dst-agent"),
    ("hybrid", "resume-destination", "kill-dst-agent"),
    ("precopy", "storage-pre", "kill-src-qemu"),
    ("postcopy", "storage-post", "kill-dst-qemu"),
    ("hybrid", "switchover", "kill-src-disks"),
    ("shared", "cleanup", "reset"),
    ("postcopy", "storage-post", "kill-dst-disks"),
    ("quick", "switchover", "cut-5s"),
    ("precopy", "memory-precopy", "cut"),
    ("hybrid", "storage-post", "cut"),
)
"""A dozen cases the test suite runs: each fault, both sides, before and after the commit, every mode."""


def representative() -> list[Case]:
    return [Case(i + 1, m, p, f) for i, (m, p, f) in enumerate(REPRESENTATIVE)]
