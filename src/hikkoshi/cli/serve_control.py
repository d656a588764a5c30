"""The control commands of `hikkoshi nbd serve`: exports, statistics, dirty bitmaps, storage moves."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from hikkoshi.block.dirty_bitmap import DEFAULT_GRANULARITY
from hikkoshi.block.file import RawFile
from hikkoshi.block.move import MoveError, StorageMove
from hikkoshi.block.move_policy import Mode
from hikkoshi.block.throttle import parse_rate
from hikkoshi.block.tracking import TrackedDevice
from hikkoshi.nbd.control import ControlError, ControlServer
from hikkoshi.nbd.server import Export, ExportTable, ListenAddress, NbdServer


class MoveService:
    """Runs storage moves, at most one per export; owns their tasks (cancelled when the server stops)."""

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
        self._stop.set()

    def start(self, name: str, move: StorageMove) -> None:
        if self._tg is None:
            raise ControlError("the server is stopping")
        running = self._tasks.get(name)
        if running is not None and not running.done():
            raise ControlError(f"a move of export {name!r} is under way")
        self.moves[name] = move
        self._tasks[name] = self._tg.create_task(self._run(move))

    @staticmethod
    async def _run(move: StorageMove) -> None:
        # The outcome is in move.progress; an error must not tear down the server's task group.
        with contextlib.suppress(Exception):
            await move.run()

    def cancel(self, name: str) -> bool:
        task = self._tasks.get(name)
        if task is None or task.done():
            return False
        task.cancel()
        return True


def _served_path(export: Export) -> str | None:
    """The file an export serves now (a move may have switched it since the server started)."""
    device = export.device
    inner = device.inner if isinstance(device, TrackedDevice) else device
    return str(inner.path) if isinstance(inner, RawFile) else None


def register_commands(
    control: ControlServer, exports: ExportTable, server: NbdServer, moves: MoveService
) -> None:
    """Control commands of a plain NBD server."""

    def find(args: dict[str, Any]) -> list[Export]:
        name = args.get("export")
        if name is None:
            return list(exports)
        export = exports.get(str(name))
        if export is None:
            raise ControlError(f"no export named {name!r}")
        return [export]

    def one(args: dict[str, Any]) -> Export:
        found = find(args)
        if len(found) != 1:
            raise ControlError(f"{len(found)} exports: say which one (export)")
        return found[0]

    def tracker(args: dict[str, Any]) -> TrackedDevice:
        device = one(args).device
        if not isinstance(device, TrackedDevice):
            raise ControlError("this export has no dirty tracking")
        return device

    def list_exports(args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": e.name,
                "size": e.device.size,
                "description": e.description,
                "path": _served_path(e),
                "read_only": e.device.capabilities.read_only,
                "connections": e.stats.connections,
            }
            for e in exports
        ]

    def stats(args: dict[str, Any]) -> dict[str, Any]:
        regions = bool(args.get("regions", False))
        return {e.name: {"size": e.device.size, **e.stats.snapshot(regions)} for e in find(args)}

    def bitmap_add(args: dict[str, Any]) -> dict[str, Any]:
        bitmap = tracker(args).add_bitmap(
            str(args["name"]), int(args.get("granularity", DEFAULT_GRANULARITY))
        )
        return {"name": args["name"], "granularity": bitmap.granularity}

    def bitmap_list(args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"name": n, "granularity": b.granularity, "dirty_bytes": b.dirty_bytes}
            for n, b in tracker(args).bitmaps.items()
        ]

    def bitmap_clear(args: dict[str, Any]) -> None:
        tracker(args).bitmap(str(args["name"])).clear()

    def bitmap_remove(args: dict[str, Any]) -> None:
        tracker(args).remove_bitmap(str(args["name"]))

    def bitmap_get(args: dict[str, Any]) -> dict[str, Any]:
        """Dirty runs as [offset, length] byte pairs (for scripts; peers use the meta context)."""
        bitmap = tracker(args).bitmap(str(args["name"]))
        shift = bitmap.shift
        runs = [[f << shift, min(c << shift, bitmap.size - (f << shift))] for f, c in bitmap.runs()]
        return {"granularity": bitmap.granularity, "dirty_bytes": bitmap.dirty_bytes, "runs": runs}

    def move(args: dict[str, Any]) -> dict[str, Any]:
        export = one(args)
        device = export.device
        if not isinstance(device, TrackedDevice):
            raise ControlError("this export cannot be moved")
        if "to" not in args:
            raise ControlError("move needs 'to' (the new path)")
        bandwidth = args.get("bandwidth")
        try:
            job = StorageMove(
                device,
                Path(str(args["to"])),
                mode=Mode(str(args.get("mode", "mirror"))),
                thick=bool(args.get("thick", False)),
                bandwidth=None if bandwidth in (None, "") else parse_rate(str(bandwidth)),
            )
            job.check()
        except MoveError as exc:
            raise ControlError(str(exc)) from None
        moves.start(export.name, job)
        return job.progress.snapshot()

    def move_status(args: dict[str, Any]) -> dict[str, Any]:
        name = one(args).name
        job = moves.moves.get(name)
        if job is None:
            raise ControlError(f"no move of export {name!r} was started")
        return job.progress.snapshot()

    def move_cancel(args: dict[str, Any]) -> dict[str, bool]:
        return {"cancelled": moves.cancel(one(args).name)}

    control.register("exports", list_exports, "list exports")
    control.register("stats", stats, "statistics per export; args: export, regions (bool)")

    async def listen(args: dict[str, Any]) -> list[str]:
        """Bind one more address (e.g. ``127.0.0.1:0`` for a migration peer); the names it got."""
        try:
            addr = ListenAddress.parse(str(args["address"]))
        except (KeyError, ValueError) as exc:
            raise ControlError(f"listen needs address HOST:PORT or unix:PATH ({exc})") from None
        try:
            return await server.add_listener(addr)
        except OSError as exc:
            raise ControlError(f"cannot listen on {args['address']}: {exc}") from None

    def unlisten(args: dict[str, Any]) -> dict[str, bool]:
        return {"removed": server.remove_listener(str(args.get("address")))}

    control.register("listening", lambda _args: list(server.bound), "addresses the server is bound to")
    control.register("listen", listen, "listen on one more address; args: address (HOST:PORT, port 0 picks)")
    control.register("unlisten", unlisten, "stop listening on a bound address; args: address (as listed)")
    control.register("bitmap-add", bitmap_add, "start a dirty bitmap; args: name, granularity, export")
    control.register("bitmap-list", bitmap_list, "dirty bitmaps of an export; args: export")
    control.register("bitmap-get", bitmap_get, "dirty runs of a bitmap; args: name, export")
    control.register("bitmap-clear", bitmap_clear, "mark a bitmap all clean; args: name, export")
    control.register("bitmap-remove", bitmap_remove, "drop a dirty bitmap; args: name, export")
    control.register(
        "move", move, "move the export's file; args: to, mode (mirror|dbt), bandwidth, thick, export"
    )
    control.register("move-status", move_status, "progress of the current or last move; args: export")
    control.register("move-cancel", move_cancel, "cancel a move (the source stays the disk); args: export")
