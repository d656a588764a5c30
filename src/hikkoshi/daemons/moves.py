"""Storage moves of a disk service's exports (storage vMotion): at most one per export, each a task the
service owns and cancels when it stops (a move not yet switched undoes itself)."""

from __future__ import annotations

import asyncio
import contextlib

from hikkoshi.block.move import StorageMove
from hikkoshi.nbd.control import ControlError


class MoveService:
    """Runs the storage moves of one disk service."""

    def __init__(self) -> None:
        self.moves: dict[str, StorageMove] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Own the moves until :meth:`close`; then cancel whatever still runs (each undoes itself)."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self._stop.wait()
            for task in self._tasks.values():
                task.cancel()
        self._tg = None

    def close(self) -> None:
        """The service stops."""
        self._stop.set()

    def start(self, name: str, move: StorageMove) -> None:
        """Start moving export ``name``; refused while another move of it runs."""
        if self._tg is None:
            raise ControlError("the server is stopping")
        if self.running(name):
            raise ControlError(f"a move of export {name!r} is under way")
        self.moves[name] = move
        self._tasks[name] = self._tg.create_task(self._run(move))

    def running(self, name: str) -> bool:
        """Whether a move of export ``name`` runs now."""
        task = self._tasks.get(name)
        return task is not None and not task.done()

    @staticmethod
    async def _run(move: StorageMove) -> None:
        # The outcome is in move.progress; an error must not tear down the server's task group.
        with contextlib.suppress(Exception):
            await move.run()

    def cancel(self, name: str) -> bool:
        """Cancel the move of export ``name``; whether one was running."""
        task = self._tasks.get(name)
        if task is None or task.done():
            return False
        task.cancel()
        return True
