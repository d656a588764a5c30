"""The source supervisor's guard over an outgoing migration: who may decide that the VM runs elsewhere.
Pure (the supervisor carries out what it says).

A migration's coordinator (in an agent, or a command) can die at any moment. Without it QEMU would sit
with the guest stopped at ``pre-switchover`` (or ``postmigrate`` after the stream), for as long as
nobody comes. So the coordinator *arms* the guard while the stream runs, renewing it every few
seconds, and before it lets the destination run it asks the source supervisor to *commit*. The guard:

- fires when the coordinator's renewals stop (``due``): the migration is cancelled and the guest runs
  on here again. A commit asked after that is refused, so the destination is never resumed;
- once committed, never fires and never lets the source run again (the destination may be running).

The supervisor serialises the two, so exactly one of "the guard fired" and "committed" happens: the
source runs again only if the destination never did, whatever dies when.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class GuardState(enum.StrEnum):
    """Where the guard stands."""

    IDLE = "idle"
    ARMED = "armed"
    FIRED = "fired"
    COMMITTED = "committed"


class GuardRefused(Exception):
    """The guard cannot do what was asked (the message says why)."""


@dataclass(frozen=True)
class Guard:
    """The guard's state; every change returns a new one."""

    state: GuardState = GuardState.IDLE
    deadline: float | None = None
    migration: str | None = None
    cancelled: frozenset[str] = frozenset()
    """Every migration the guard fired for: none of them may ever commit (a coordinator that was only
    stalled, not dead, must not take one up again, even after another migration came in between)."""

    def arm(self, migration: str, now: float, timeout: float) -> Guard:
        """The coordinator of ``migration`` is alive: fire unless renewed within ``timeout`` seconds."""
        if timeout <= 0:
            raise GuardRefused("the guard's timeout must be positive")
        if migration in self.cancelled:
            raise GuardRefused(f"migration {migration} was cancelled here when its coordinator went silent")
        if self.state == GuardState.COMMITTED and self.migration == migration:
            return self  # renewals after the commit change nothing
        if self.state == GuardState.COMMITTED:
            raise GuardRefused(f"migration {self.migration} committed: this VM runs elsewhere now")
        return Guard(GuardState.ARMED, now + timeout, migration, self.cancelled)

    def commit(self, migration: str) -> Guard:
        """The coordinator lets the destination run: from now on the source never runs again."""
        if self.state == GuardState.COMMITTED:
            if self.migration != migration:
                raise GuardRefused(f"migration {self.migration} committed already")
            return self
        if migration in self.cancelled:
            raise GuardRefused(f"migration {migration} was cancelled here when its coordinator went silent")
        return Guard(GuardState.COMMITTED, None, migration, self.cancelled)

    def disarm(self, migration: str) -> Guard:
        """The migration ended without a commit (rolled back by its coordinator): stand down."""
        if self.state == GuardState.COMMITTED:
            raise GuardRefused(f"migration {self.migration} committed: it cannot be undone here")
        if self.migration not in (None, migration):
            return self  # someone else's: leave it
        return Guard(cancelled=self.cancelled)

    def due(self, now: float) -> bool:
        """Whether the guard must fire now."""
        return self.state == GuardState.ARMED and self.deadline is not None and now > self.deadline

    def fired(self) -> Guard:
        """The supervisor cancelled the migration and let the guest run here."""
        assert self.migration is not None
        return replace(
            self, state=GuardState.FIRED, deadline=None, cancelled=self.cancelled | {self.migration}
        )

    @property
    def may_resume_source(self) -> bool:
        """Whether the guest may run here (again)."""
        return self.state != GuardState.COMMITTED
