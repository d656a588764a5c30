"""Which way a live migration left in the middle must go, from what both sides say now. Pure.

The rule users trust us for: a VM runs in exactly one place; the source runs again only if the
destination never did. The destination runs only after the source supervisor *committed* (see
:mod:`hikkoshi.daemons.migration_guard`), and the commit is recorded in the migration's record right
after. So a job taken over after a crash decides from the record and from the two sides:

- the record says committed, or the source supervisor does: forward (resume the destination), or wait
  while the destination cannot be reached. If the destination's VM is gone (its QEMU died), the VM is
  the destination's all the same: forward, and the job waits until it is started there again (it may
  have run, so the source never runs again; it keeps serving the disks the destination needs);
- not committed and the source's QEMU lives: back (the destination never ran);
- not committed and the source's QEMU is gone: the destination is the only copy of the guest if its
  stream completed: forward; else the guest is lost with the source's QEMU (back: clean up).

A destination that runs without a commit (never our doing) wins: the source must not run.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Way(enum.StrEnum):
    """What a taken-over migration does."""

    FORWARD = "forward"
    BACK = "back"
    WAIT = "wait"
    """A side that must act cannot be reached now: try again later."""
    FAILED = "failed"
    """Neither way is safe: a person must look (the record says why)."""


@dataclass(frozen=True)
class SourceView:
    """What the source says now."""

    qemu_alive: bool
    """The source QEMU exists (its supervisor answers and has one)."""
    committed: bool
    """The source supervisor's guard committed this migration."""


@dataclass(frozen=True)
class DestinationView:
    """What the destination says now."""

    reachable: bool
    exists: bool = True
    """Its incoming VM (supervisor) is there."""
    stream_completed: bool = False
    """Its QEMU received the whole stream."""
    ran: bool = False
    """Its guest has run (it was resumed)."""


@dataclass(frozen=True)
class Decision:
    """A way, and why."""

    way: Way
    reason: str


def decide(record_committed: bool, source: SourceView, dest: DestinationView) -> Decision:
    """The way a migration must go (see the module's docstring)."""
    committed = record_committed or source.committed
    if dest.reachable and dest.exists and dest.ran:
        return Decision(Way.FORWARD, "the destination has run: it is the VM now")
    if committed:
        if not dest.reachable:
            return Decision(Way.WAIT, "committed, and the destination cannot be reached: waiting for it")
        if not dest.exists:
            return Decision(
                Way.FORWARD,
                "committed, and the destination's VM is gone: it is the VM all the same (the source stays "
                "stopped); started there again, it carries on",
            )
        return Decision(Way.FORWARD, "committed: the destination runs the VM")
    if source.qemu_alive:
        return Decision(Way.BACK, "not committed: the destination never ran, the source takes over")
    if not dest.reachable:
        return Decision(Way.WAIT, "the source's QEMU is gone and the destination cannot be reached")
    if dest.exists and dest.stream_completed:
        return Decision(Way.FORWARD, "the source's QEMU is gone and the destination holds the whole guest")
    return Decision(Way.BACK, "the source's QEMU is gone before the stream completed: the guest ended there")
