"""A person cancels a migration. Before the commit point the job rolls back (the VM runs on at the
source, the destination's leftovers go); past it there is no way back, and the request is refused: the
job finishes forward."""

from __future__ import annotations

from hikkoshi.agent.errors import Conflict
from hikkoshi.agent.jobs import Jobs
from hikkoshi.agent.models import MigrationInfo
from hikkoshi.migrate.phases import Phase, committed


def cancel_migration(jobs: Jobs, migration_id: str) -> MigrationInfo:
    """Cancel a running migration of this agent (see the module); the migration as it stands now."""
    info = jobs.info(migration_id)  # NotFound
    state = jobs.jobs.get(migration_id)
    task = state.task if state is not None else None
    if state is None or not state.running or task is None or task.done():
        raise Conflict(f"migration {migration_id} is not running here (it is at {info.phase})")
    record = state.job.record
    if record.phase == Phase.ROLLBACK or task.cancelling():
        raise Conflict(f"migration {migration_id} is rolling back already")
    if committed(record.phase) or record.facts.committed:
        raise Conflict(
            f"migration {migration_id} is past its commit point ({record.phase}): it can only finish forward"
        )
    # Delivered at the job's next await, which is before its commit: the job's own handler rolls back.
    task.cancel()
    return jobs.info(migration_id)
