"""A test hook: hold a migration job at the entry of one of its phases, so that a test can inject a fault
exactly there (kill a process, cut a link) and then let the job go on into it.

Off unless ``HIKKOSHI_PAUSE_DIR=DIR`` is in the environment of the process that runs the job (an agent):
then a job entering phase ``P`` holds if the file ``DIR/pause-at`` names ``P``. It writes ``DIR/ID.paused``
(``ID`` the migration's id; the file says the phase) and waits until that file is gone; the test removes
``pause-at`` first, so a job taken over later does not hold again. A hold lasts at most
:data:`HOLD_LIMIT` seconds: a test that died never keeps a job waiting for good.
:mod:`hikkoshi.block.crashpoints` is the other hook (the process dies at a named point); the fault
campaign (``python -m bench.run_faults``) uses both. Nothing else does.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

ENV = "HIKKOSHI_PAUSE_DIR"
HOLD_LIMIT = 120.0


async def reached(migration: str, phase: str) -> None:
    """Hold here if the test asked for this phase (see the module's docstring)."""
    where = os.environ.get(ENV)
    if not where:
        return
    folder = Path(where)
    try:
        wanted = (folder / "pause-at").read_text().strip()
    except OSError:
        return
    if wanted != phase:
        return
    marker = folder / f"{migration}.paused"
    marker.write_text(phase)
    deadline = time.monotonic() + HOLD_LIMIT
    while time.monotonic() < deadline:
        if not marker.exists():
            return
        await asyncio.sleep(0.02)  # a file another process removes: polled
    marker.unlink(missing_ok=True)
