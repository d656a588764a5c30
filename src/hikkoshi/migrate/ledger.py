"""Where a migration's commit is recorded besides the source supervisor: nowhere on its own (one host, or
two agents without a cluster), the cluster's owner key in a cluster (the agent provides that ledger).

The order is fixed: the ledger is asked first whether it can take the commit now (a cluster: etcd
answers and the owner key still names the source); then the source supervisor commits (after which the
source never runs again, and its guard can no longer fire); then the ledger records it (moves the VM's
ownership to the destination and returns the fencing token the destination must present to resume
it). So the owner key moves only once the source cannot run any more, and the destination runs only
once it moved. A ledger that cannot be reached after the supervisor committed never makes the migration
go back: the job waits for it and goes on.
"""

from __future__ import annotations

from typing import Protocol

from hikkoshi.migrate.record import MigrationRecord


class CommitLedger(Protocol):
    """See the module's docstring."""

    async def prepare(self, record: MigrationRecord) -> None:
        """Right before the source supervisor commits: :class:`~hikkoshi.migrate.sides.SideError` if
        the ledger could not record the commit now (the migration then rolls back)."""

    async def record_commit(self, record: MigrationRecord) -> int | None:
        """The VM is the destination's from now on; the fencing token it resumes with (``None``: none
        is needed). Safe to repeat."""

    async def is_committed(self, record: MigrationRecord) -> bool:
        """Whether the ledger says the VM moved to the destination already."""


class NoLedger:
    """No ledger: the source supervisor's commit is the only one."""

    async def prepare(self, record: MigrationRecord) -> None:
        return None

    async def record_commit(self, record: MigrationRecord) -> int | None:
        return None

    async def is_committed(self, record: MigrationRecord) -> bool:
        return False
