"""A QMP session with one QEMU, through the ``qemu.qmp`` library, with timeouts on everything.

The supervisor listens on the VM's QMP socket and QEMU connects to it at start-up
(``-chardev socket,path=...`` as a client): no polling for a socket to appear, and no window in
which someone else could take the monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from hikkoshi.aio import within

DEFAULT_TIMEOUT = 30.0

# qemu.qmp logs a lost connection as an error with a traceback; a QEMU that exits is normal for us.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QmpCommandError(RuntimeError):
    """A QMP command failed or timed out."""


class MigrationWaitTimeout(QmpCommandError):
    """The migration did not reach the states waited for in time."""


class QmpSession:
    """The supervisor's end of QEMU's monitor."""

    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)
        self._listening = False

    async def listen(self, path: Path) -> None:
        """Listen on ``path`` for QEMU to connect."""
        await self._client.start_server(str(path))
        self._listening = True

    async def accept(self) -> None:
        """Take QEMU's connection and negotiate capabilities."""
        await self._client.accept()

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, limit: float = DEFAULT_TIMEOUT
    ) -> Any:
        """Run a QMP command; its return value, or :class:`QmpCommandError` (also after ``limit`` s)."""
        try:
            return await within(self._client.execute(command, arguments), limit)
        except TimeoutError:
            raise QmpCommandError(f"QMP {command}: no answer within {limit:.0f} s") from None
        except (QMPError, OSError, EOFError) as exc:
            raise QmpCommandError(f"QMP {command}: {exc}") from None

    async def status(self) -> str:
        """``query-status``: ``running``, ``paused``, ``shutdown``, ``io-error``, ..."""
        result = await self.execute("query-status")
        return str(result["status"])

    async def wait_migration(self, states: frozenset[str], limit: float) -> dict[str, Any]:
        """Wait until the migration (out or in) reaches one of ``states``; ``query-migrate`` then.

        Listens to ``MIGRATION`` events (the ``events`` capability must be on) and checks the
        current state once the listener is in place, so no change can slip between the two."""
        try:
            async with asyncio.timeout(limit):
                with self._client.listener("MIGRATION") as listener:
                    info: dict[str, Any] = await self.execute("query-migrate")
                    while info.get("status") not in states:
                        event = await listener.get()
                        data = event["data"] if "data" in event else {}  # noqa: SIM401 (Message is no dict)
                        status = data.get("status") if isinstance(data, dict) else None
                        if status in states:
                            info = await self.execute("query-migrate")
                            if info.get("status") not in states:  # moved on already: report the event's
                                info = {**info, "status": status}
                    return info
        except TimeoutError:
            raise MigrationWaitTimeout(f"migration did not reach {sorted(states)} within {limit} s") from None

    async def close(self) -> None:
        """Disconnect (or stop listening); errors of a connection QEMU already closed are expected."""
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
