"""Carrying out a plan's moves: each one a migration started at its source host's agent (a cluster
job: it holds slots of the limited resources, and waits in the queue while a limit is reached), then
followed there until it ends. Used by ``drs apply``, ``host maintenance --enter`` and the automatic
planner."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hikkoshi.agent.client import AgentClient, AgentError
from hikkoshi.agent.drs_read import ClusterState
from hikkoshi.drs.plan import Move, MoveKind

Connect = Callable[[str], AgentClient]
"""An agent's client, from its API address."""


@dataclass
class Carried:
    """One move and what became of it."""

    move: Move
    url: str = ""
    migration: str | None = None
    phase: str = "starting"
    running: bool = True
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.phase == "done"

    def to_json(self) -> dict[str, object]:
        return {
            **self.move.to_json(),
            "migration": self.migration,
            "phase": self.phase,
            "error": self.error,
            "report": self.info.get("report") or None,
        }


def request_of(state: ClusterState, move: Move) -> tuple[str, dict[str, object]]:
    """The agent API path and body that start ``move``."""
    body: dict[str, object]
    if move.kind is MoveKind.STORAGE:
        store = state.datastore_name(move.source, move.datastore or "") or ""
        return f"/v1/vms/{move.vm}/storage-migrate", {"datastore": store}
    if move.kind is MoveKind.OFFLINE:
        body = {"to": move.target, "mode": "offline"}
    else:
        body = {"to": move.target, "storage": "shared" if move.datastore is None else "hybrid"}
    if move.datastore is not None:
        name = state.datastore_name(move.target, move.datastore)
        if name is not None:
            body["datastore"] = name
    return f"/v1/vms/{move.vm}/migrate", body


async def start(state: ClusterState, moves: Sequence[Move], connect: Connect) -> list[Carried]:
    """Start every move (each is queued by its agent while a limit is reached)."""
    out = []
    for move in moves:
        c = Carried(move)
        host = state.host(move.source)
        if host is None or host.status is None:
            c.error, c.running, c.phase = f"host {move.source!r} is down", False, "failed"
            out.append(c)
            continue
        c.url = host.info.api_address
        path, body = request_of(state, move)
        try:
            async with connect(c.url) as client:
                c.migration = (await client.post(path, body))["id"]
        except AgentError as e:
            c.error, c.running, c.phase = e.detail, False, "failed"
        out.append(c)
    return out


async def follow(
    carried: Sequence[Carried],
    connect: Connect,
    on_change: Callable[[Carried], None] = lambda c: None,
    *,
    every: float = 0.5,
) -> None:
    """Until every started move has ended; ``on_change`` after each change of phase."""
    while any(c.running for c in carried):
        for c in carried:
            if not c.running or c.migration is None:
                continue
            try:
                async with connect(c.url) as client:
                    info = await client.get(f"/v1/migrations/{c.migration}")
            except AgentError as e:
                if e.status == 0:
                    continue  # the agent may be restarting: ask again
                c.error, c.running, c.phase = e.detail, False, "failed"
                on_change(c)
                continue
            progress = info.get("progress") or {}
            phase = "queued" if progress.get("phase") == "queued" else str(info["phase"])
            changed = phase != c.phase or not info["running"]
            c.phase, c.running, c.info = phase, bool(info["running"]), info
            if not c.running and phase != "done":
                c.error = str(info.get("error") or f"ended {phase}")
            if changed:
                on_change(c)
        if any(c.running for c in carried):
            await asyncio.sleep(every)
