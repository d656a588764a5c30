"""The states an agent records for the VMs in its datastores (its database's ``vms`` rows), and what
it publishes of them to the cluster."""

from __future__ import annotations

import enum


class RowState(enum.StrEnum):
    """A VM as this host's agent sees it."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    INCOMING = "incoming"
    """Arriving by a migration that has not committed: it must not run here on its own."""
    SERVING = "serving"
    """Not running here: this host holds its disks for the host that runs it."""
    FENCED = "fenced"
    """Found running here while the cluster says another host owns it: paused, started nowhere by us."""


#: Rows a migration or a holder owns: adoption and sweeps leave them alone.
MIGRATION_ROWS = frozenset({RowState.INCOMING, RowState.SERVING})
