"""Disks of a powered-off VM moving between hosts: the source serves them read-only over NBD, the
destination pulls each completely with a relocation proxy (holes stay holes, a crash loses nothing
flushed, the copy resumes), and keeps the finished cache as the disk."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hikkoshi.aio import within
from hikkoshi.daemons.entry import READY_PREFIX, image_service_argv, proxy_argv
from hikkoshi.migrate.sides import SideError
from hikkoshi.nbd.control import ControlError, control_request
from hikkoshi.vm.procs import Child

#: How long a pull may go without any progress before it is given up.
STALL_LIMIT = 120.0


async def serve_read_only(
    files: dict[str, Path],
    address: str,
    control: Path,
    log: Path,
    python: str = sys.executable,
    *,
    tls_dir: Path | None = None,
    peer: str | None = None,
) -> tuple[Child, str]:
    """Serve ``files`` (export name to path) read-only on ``address`` (``HOST:0``); the server and the
    base of its export URIs (``nbd://HOST:PORT``, or ``nbds://`` with ``tls_dir``: this host's TLS files,
    admitting ``peer``'s certificate only)."""
    cmd = image_service_argv(
        files, address, control, read_only=True, python=python, tls_dir=tls_dir, peer=peer
    )
    with log.open("ab") as out:
        child = await Child.start("disk export", cmd, stdout=asyncio.subprocess.PIPE, stderr=out)
    try:
        line = await within(child.stdout_line(), 60)
    except TimeoutError:
        line = ""
    if not line.startswith((f"{READY_PREFIX} nbd://", f"{READY_PREFIX} nbds://")):
        await child.terminate(grace=5.0)
        tail = await asyncio.to_thread(log.read_text)
        raise SideError(f"the read-only export of the disks did not start: {line or tail[-1000:]}")
    return child, line.split()[-1].rstrip("/")


async def pull_disk(
    uri: str,
    path: Path,
    size: int,
    *,
    python: str = sys.executable,
    on_progress: Callable[[int], None] | None = None,
    log: Path | None = None,
    tls_dir: Path | None = None,
) -> dict[str, Any]:
    """Copy the export ``uri`` completely into ``path`` (new, or a pull that was interrupted) with a
    relocation proxy (``tls_dir``: this host's TLS files, for an ``nbds://`` export); return its last
    status. The file is flushed when this returns."""
    with tempfile.TemporaryDirectory(prefix="hk-pull-", dir="/tmp") as tmp:  # short: socket paths
        control = Path(tmp) / "control.sock"
        cmd = proxy_argv(uri, path, size, f"unix:{tmp}/nbd.sock", control, python, tls_dir=tls_dir)
        with (log or Path("/dev/null")).open("ab") as out:
            child = await Child.start(f"pull of {path.name}", cmd, stdout=out, stderr=out)
        try:
            status = await _wait_complete(child, control, on_progress)
        finally:
            await child.terminate(grace=30.0)  # flushes; the cache is complete
    if child.returncode not in (0, None):
        raise SideError(f"the pull of {path.name} ended with status {child.returncode}")
    # The cache is the whole disk now: its presence bitmap has nothing more to say.
    path.with_name(path.name + ".bitmap").unlink(missing_ok=True)
    return status


async def _wait_complete(
    child: Child, control: Path, on_progress: Callable[[int], None] | None
) -> dict[str, Any]:
    last_change, last_present = time.monotonic(), -1
    while True:
        if not child.running:
            raise SideError(f"the relocation proxy exited ({child.returncode}) before the disk was complete")
        status: dict[str, Any] | None = None
        with contextlib.suppress(OSError, ControlError):
            status = await control_request(control, "status")
        if status is not None:
            present = int(status["present_bytes"])
            if on_progress is not None:
                on_progress(present)
            if status["upstream"] == "detached" and present >= int(status["size"]):
                return status
            if present != last_present:
                last_change, last_present = time.monotonic(), present
        if time.monotonic() - last_change > STALL_LIMIT:
            raise SideError(f"the pull made no progress for {STALL_LIMIT:.0f} s")
        await asyncio.sleep(0.1)
