"""The control socket: JSON requests over a Unix socket, one per line, each answered by one line.

Request: ``{"command": NAME, ...arguments}``. Answer: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": MESSAGE}``. Later layers (dirty tracking, mirroring, the proxy) register
commands of their own with :meth:`ControlServer.register`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("hikkoshi.nbd.control")

Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]
_MAX_LINE = 1 << 20


class ControlError(Exception):
    """A control command failed; the message goes back to the caller."""


class ControlServer:
    """Serves registered commands on a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handlers: dict[str, tuple[Handler, str]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.register("help", self._help, "list commands")

    def register(self, name: str, handler: Handler, help_text: str = "") -> None:
        """Add a command."""
        if name in self._handlers:
            raise ValueError(f"control command {name!r} registered twice")
        self._handlers[name] = (handler, help_text)

    def _help(self, args: dict[str, Any]) -> dict[str, str]:
        return {name: text for name, (_, text) in sorted(self._handlers.items())}

    async def start(self) -> None:
        from hikkoshi.nbd.server import _remove_stale_socket

        _remove_stale_socket(self.path)
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=_MAX_LINE)
        self.path.chmod(0o600)  # statistics and, later, control over disks: owner only

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self.path.unlink(missing_ok=True)

    async def call(self, request: Any) -> dict[str, Any]:
        """Answer one decoded request (also usable in-process)."""
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'a request is a JSON object with a string "command"'}
        entry = self._handlers.get(request["command"])
        if entry is None:
            return {"ok": False, "error": f"unknown command {request['command']!r}; try 'help'"}
        args = {k: v for k, v in request.items() if k != "command"}
        try:
            result = entry[0](args)
            if inspect.isawaitable(result):
                result = await result
        except (ControlError, ValueError, KeyError, TypeError, OSError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "result": result}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                except ValueError as exc:
                    answer: dict[str, Any] = {"ok": False, "error": f"not JSON: {exc}"}
                else:
                    answer = await self.call(request)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.info("control client dropped: %s", exc)
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def control_request(path: Path, command: str, **args: Any) -> Any:
    """Send one command to a control socket; return its result or raise ControlError."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=_MAX_LINE)
    try:
        writer.write(json.dumps({"command": command, **args}).encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    if not line:
        raise ControlError("control socket closed without an answer")
    answer = json.loads(line)
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "unknown error"))
    return answer.get("result")
