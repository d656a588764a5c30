"""Routes beside the agent's API for following and steering one migration: its timeline as data, and a
person's cancel. Kept apart from ``api.py``; the same token guards them (the app's middleware)."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Path, Query

from hikkoshi.agent.cancel import cancel_migration
from hikkoshi.agent.models import MigrationInfo
from hikkoshi.agent.samples import MigrationSamples, migration_samples
from hikkoshi.agent.service import Agent

MigrationId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]


def add_migration_routes(app: FastAPI, agent: Agent) -> None:
    """Add ``GET /v1/migrations/{id}/samples`` and ``POST /v1/migrations/{id}/cancel`` to ``app``."""

    @app.get("/v1/migrations/{migration_id}/samples", response_model=MigrationSamples, tags=["migrations"])
    async def samples(
        migration_id: MigrationId, offset: Annotated[int, Query(ge=0, le=1 << 31)] = 0
    ) -> MigrationSamples:
        """The migration's timeline as data (what ``timeline.png`` draws), from sample ``offset`` on;
        live while it runs."""
        return migration_samples(agent.jobs, migration_id, offset)

    @app.post("/v1/migrations/{migration_id}/cancel", response_model=MigrationInfo, tags=["migrations"])
    async def cancel(migration_id: MigrationId) -> MigrationInfo:
        """Cancel a running migration: before its commit point it rolls back (409 after it: it can only
        finish forward)."""
        return cancel_migration(agent.jobs, migration_id)
