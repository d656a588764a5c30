"""One agent per state directory: the first holds an exclusive lock on ``STATE_DIR/agent.lock`` for its
life (the kernel lets it go when the process ends, however it ends); a second is refused with the first
one's pid. Two agents on one state would both take over the same migrations and VMs."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from hikkoshi.agent.db import StateError

LOCK_FILE = "agent.lock"


def lock_state_dir(state_dir: Path) -> int:
    """Make ``state_dir`` (mode 0700) and take its lock; the descriptor that holds it (keep it open)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    state_dir.chmod(0o700)  # sockets, the database and the host's TLS files live here
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with contextlib.suppress(OSError, ValueError):
            pid = int(os.pread(fd, 32, 0).decode().strip() or 0)
            os.close(fd)
            raise StateError(f"another agent (pid {pid}) uses the state directory {state_dir}") from None
        os.close(fd)
        raise StateError(f"another agent uses the state directory {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
