"""The ``hikkoshi`` command as a user runs it, for tests of its messages and exit codes."""

from __future__ import annotations

import subprocess
import sys


def hikkoshi(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``hikkoshi ARGS`` as a user runs it: its exit status, stdout and stderr (no check)."""
    return subprocess.run(
        [sys.executable, "-m", "hikkoshi", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
