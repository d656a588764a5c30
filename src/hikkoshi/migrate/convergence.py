"""How memory pre-copy is steered to an end: a schedule kept as data, decisions by pure functions.

QEMU copies RAM in iterations (each one a pass over the pages dirtied since the last). After every
iteration the coordinator hands :func:`decide` what ``query-migrate`` says. While the remaining
memory keeps shrinking nothing is done: QEMU switches over by itself once the rest fits the downtime
limit. When it stops shrinking for ``stall_iterations`` iterations in a row, the next escalation of the
schedule is taken, in this order:

1. raise the downtime limit, step by step, up to the user's maximum;
2. throttle the guest's vCPUs harder (QEMU auto-converge), step by step;
3. switch to post-copy RAM, where the user allowed it;
4. give up: abort, and the migration rolls back.

A migration that runs longer than ``max_seconds`` skips straight to post-copy or abort. Each
escalation restarts the stall count, so every step gets a fair chance to work.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class Schedule:
    """The escalation steps of one migration."""

    downtime_ms: tuple[int, ...]
    """Downtime limits to try, rising; the first is set before the migration starts."""
    throttle_percent: tuple[int, ...] = ()
    """vCPU throttle levels to try once the downtime steps are used up (empty: no throttling)."""
    allow_postcopy: bool = False
    stall_iterations: int = 2
    """Iterations without progress before the next step."""
    shrink: float = 0.95
    """An iteration makes progress if the remaining memory falls below ``shrink`` x the best so far."""
    max_seconds: float = 600.0

    def __post_init__(self) -> None:
        if not self.downtime_ms or any(d <= 0 for d in self.downtime_ms):
            raise ValueError("the schedule needs positive downtime limits")
        if any(b <= a for a, b in itertools.pairwise(self.downtime_ms)):
            raise ValueError("downtime limits must rise")
        throttle = self.throttle_percent
        if any(not 0 < t < 100 for t in throttle) or any(b <= a for a, b in itertools.pairwise(throttle)):
            raise ValueError("throttle levels must rise, between 1 and 99 percent")
        if self.stall_iterations < 1 or not 0 < self.shrink <= 1 or self.max_seconds <= 0:
            raise ValueError("bad stall_iterations, shrink or max_seconds")


def build_schedule(
    max_downtime_ms: int,
    *,
    steps: int = 4,
    start_ms: int = 50,
    auto_converge: bool = True,
    allow_postcopy: bool = False,
    max_seconds: float = 600.0,
) -> Schedule:
    """The default schedule: ``steps`` downtime limits rising geometrically from ``start_ms`` to the
    user's maximum, then throttling at 20, 40, 60 and 80 %, then post-copy if allowed."""
    if max_downtime_ms <= 0 or start_ms <= 0:
        raise ValueError("the maximum and first downtime must be positive")
    start = min(start_ms, max_downtime_ms) if steps > 1 else max_downtime_ms
    levels = [start]
    if steps > 1 and max_downtime_ms > start:
        ratio = (max_downtime_ms / start) ** (1 / (steps - 1))
        levels += [round(start * ratio**i) for i in range(1, steps - 1)] + [max_downtime_ms]
    return Schedule(
        downtime_ms=tuple(sorted(set(levels))),
        throttle_percent=(20, 40, 60, 80) if auto_converge else (),
        allow_postcopy=allow_postcopy,
        max_seconds=max_seconds,
    )


@dataclass(frozen=True)
class Observation:
    """What ``query-migrate`` said after an iteration."""

    iteration: int
    """QEMU's ``dirty-sync-count``."""
    remaining: int
    """Bytes of RAM still to send."""
    elapsed: float
    """Seconds since the migration started."""


@dataclass(frozen=True)
class Progress:
    """The decision state carried from one iteration to the next."""

    downtime_step: int = 0
    throttle_step: int = -1
    """-1: not throttling yet."""
    postcopy: bool = False
    best_remaining: int | None = None
    stalled: int = 0
    last_iteration: int = -1


Kind = Literal["continue", "set-downtime", "throttle", "postcopy", "abort"]


@dataclass(frozen=True)
class Action:
    """What to do now."""

    kind: Kind
    value: int = 0
    """Milliseconds for ``set-downtime``, percent for ``throttle``."""
    reason: str = ""


CONTINUE = Action("continue")


def _escalate(schedule: Schedule, p: Progress, why: str) -> tuple[Progress, Action]:
    fresh = replace(p, stalled=0, best_remaining=None)
    if p.downtime_step + 1 < len(schedule.downtime_ms):
        step = p.downtime_step + 1
        ms = schedule.downtime_ms[step]
        return replace(fresh, downtime_step=step), Action("set-downtime", ms, why)
    if p.throttle_step + 1 < len(schedule.throttle_percent):
        step = p.throttle_step + 1
        return replace(fresh, throttle_step=step), Action("throttle", schedule.throttle_percent[step], why)
    if schedule.allow_postcopy and not p.postcopy:
        return replace(fresh, postcopy=True), Action("postcopy", 0, why)
    return p, Action("abort", 0, why + "; nothing left to try")


def decide(schedule: Schedule, p: Progress, obs: Observation) -> tuple[Progress, Action]:
    """The next step after ``obs``; call it as often as you like, it acts once per iteration."""
    if p.postcopy:
        return p, CONTINUE  # post-copy always finishes; nothing more to steer
    if obs.elapsed > schedule.max_seconds:
        if schedule.allow_postcopy:
            return replace(p, postcopy=True), Action("postcopy", 0, f"running for {obs.elapsed:.0f} s")
        return p, Action("abort", 0, f"not converged after {obs.elapsed:.0f} s")
    if obs.iteration <= p.last_iteration:
        return p, CONTINUE
    p = replace(p, last_iteration=obs.iteration)
    if obs.iteration < 2:
        return p, CONTINUE  # the first pass copies everything: nothing to judge yet
    if p.best_remaining is None or obs.remaining < p.best_remaining * schedule.shrink:
        return replace(p, best_remaining=obs.remaining, stalled=0), CONTINUE
    p = replace(p, stalled=p.stalled + 1)
    if p.stalled < schedule.stall_iterations:
        return p, CONTINUE
    return _escalate(schedule, p, f"{obs.remaining} bytes left, not shrinking for {p.stalled} iterations")
