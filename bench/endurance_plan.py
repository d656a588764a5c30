"""Which moves the endurance benchmark makes, in order. Pure.

One VM moves again and again, cycling the storage modes (postcopy, hybrid, precopy, shared, quick,
storage-migrate): a live or quick move goes to the next host round the ring of agents, a storage
migration to the host's other datastore. With three hosts the cycle meets every case a VM can be in: a
relocated disk moving on, a disk held by the host the VM left (shared) pulled on to a third host, a
VM coming home to its disks' holder (two hosts), a held disk pulled in by a storage migration.

The last move of a run never leaves a holder behind (shared storage keeps the disk on the host the VM
left): the run then ends with the VM in exactly one home.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("postcopy", "hybrid", "precopy", "shared", "quick", "storage")
"""The cycle. ``quick``: the guest paused while it moves (storage mode hybrid); ``storage``: a storage
migration to the host's other datastore."""


@dataclass(frozen=True)
class Move:
    """One move: its number (from 1), its mode, and the hosts (indexes) it goes between."""

    number: int
    mode: str
    source: int
    target: int

    @property
    def between_hosts(self) -> bool:
        return self.mode != "storage"


def plan(count: int, hosts: int, *, first: int = 1, start_host: int = 0, offset: int = 0) -> list[Move]:
    """``count`` moves from host ``start_host``, numbered from ``first``, the cycle entered at
    ``offset``; a last move in ``shared`` mode becomes ``hybrid``."""
    if hosts < 2:
        raise ValueError("moves between hosts need two hosts at least")
    moves = []
    here = start_host
    for i in range(count):
        mode = MODES[(offset + i) % len(MODES)]
        if i == count - 1 and mode == "shared":
            mode = "hybrid"
        there = here if mode == "storage" else (here + 1) % hosts
        moves.append(Move(first + i, mode, here, there))
        here = there
    return moves
