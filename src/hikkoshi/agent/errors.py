"""Errors of the agent that answer with a 4xx status (the API maps them; messages are for people)."""

from __future__ import annotations

from hikkoshi.vm.errors import PrecheckError, RuntimeStateError, SpecError, VmError, VmStartError


class Problem(Exception):
    """A request the agent cannot do; ``status`` is the HTTP status it answers."""

    status = 400


class NotFound(Problem):
    """No such VM, datastore or migration here."""

    status = 404


class Conflict(Problem):
    """Not in this state (running, busy, exists already)."""

    status = 409


def status_of(exc: Exception) -> int:
    """The HTTP status for an error from the layers below."""
    if isinstance(exc, Problem):
        return exc.status
    if isinstance(exc, SpecError | PrecheckError | ValueError):
        return 422
    if isinstance(exc, RuntimeStateError):
        return 409
    if isinstance(exc, VmStartError):
        return 424  # QEMU or the disks did not come up: the request failed on what it depends on
    if isinstance(exc, VmError):
        return 409
    return 400
