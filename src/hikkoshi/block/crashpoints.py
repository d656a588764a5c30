"""Named points where a test can make the process die, to prove crash safety at each step of a job.

``HIKKOSHI_CRASH_AT=NAME`` in the environment: the process kills itself with SIGKILL (no cleanup, no
flush: what a power cut or the OOM killer does) the first time it reaches the point ``NAME``.
"""

from __future__ import annotations

import os
import signal

_ENV = "HIKKOSHI_CRASH_AT"


def reached(name: str) -> None:
    """Die here if asked to."""
    if os.environ.get(_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
