"""Where a migration's commit is recorded besides the source supervisor: nowhere on its own (one host, or
two agents without a cluster), the cluster's owner key in a cluster (the agent provides that ledger).

The order is fixed: the source supervisor commits first (after which the source never runs again), then
the ledger (which moves the VM's ownership to the destination and returns the fencing token the
destination must present to resume it). A ledger that cannot be reached after the supervisor committed
never makes the migration go back: the job waits for it and goes on.
"""

from __future__ import annotations

from typing import Protocol

from hikkoshi.migrate.record import MigrationRecord


class CommitLedger(Protocol):
    """See the module's docstring."""

    async def record_commit(self, record: MigrationRecord) -> int | None:
        """The VM is the destination's from now on; the fencing token it resumes with (``None``: none
        is needed). Safe to repeat."""

    async def is_committed(self, record: MigrationRecord) -> bool:
        """Whether the ledger says the VM moved to the destination already."""


class NoLedger:
    """No ledger: the source supervisor's commit is the only one."""

    async def record_commit(self, record: MigrationRecord) -> int | None:
        return None

    async def is_committed(self, record: MigrationRecord) -> bool:
        return False
