"""Where the dashboard's data comes from and where its actions go: one small interface, two kinds.

``--agent URL ...`` (:mod:`hikkoshi.web.agent_source`): the agents given, each asked directly. There is
no cluster: no maintenance mode, no DRS. ``--etcd URL`` (:mod:`hikkoshi.web.etcd_source`): the hosts
the cluster lists (up, down, in maintenance), each host's agent for the details and every action,
and maintenance through the cluster's own keys. Every migration, cancel and read goes through the
agents' HTTP API, the same one the CLI uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from hikkoshi.web.views import MigrationView, Overview, Recommendation


class SourceError(Exception):
    """An agent refused, or could not be reached; ``status`` is what the page answers with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class NotAvailable(SourceError):
    """What was asked does not exist with this source (say, maintenance without a cluster)."""

    def __init__(self, detail: str) -> None:
        super().__init__(409, detail)


@dataclass(frozen=True)
class Capabilities:
    """What a source can do beyond hosts, VMs and migrations; the notes say why not, for the page."""

    maintenance: bool
    drs: bool
    maintenance_note: str = ""
    drs_note: str = ""


class Source(Protocol):
    """The dashboard's view of the cluster (see the module)."""

    kind: str
    """``agents`` or ``etcd``: named on the pages."""
    capabilities: Capabilities

    async def overview(self) -> Overview:
        """Hosts, VMs and migrations, read in one go (hosts that do not answer are listed so)."""
        ...

    async def migration(self, migration_id: str) -> MigrationView:
        """One migration (:class:`SourceError` 404 if no agent knows it)."""
        ...

    async def samples(self, migration_id: str, offset: int) -> tuple[list[dict[str, Any]], int]:
        """A migration's timeline samples from ``offset`` on, and how many there are in all."""
        ...

    async def migrate(self, vm: str, host: str, destination: str, storage: str) -> str:
        """Start a live migration of ``vm`` (held by ``host``) to host ``destination``; its id."""
        ...

    async def cancel(self, migration_id: str) -> None:
        """Cancel a running migration (before its commit point it rolls back)."""
        ...

    async def set_maintenance(self, host: str, on: bool, reason: str = "") -> None:
        """Put a host in maintenance, or take it out (:class:`NotAvailable` without a cluster)."""
        ...

    async def recommendations(self) -> list[Recommendation]:
        """DRS's recommended moves (:class:`NotAvailable` without DRS)."""
        ...

    async def apply(self, recommendation_id: str) -> str:
        """Carry out a recommendation: the migration's id."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...
