"""Running an asyncio main with uvloop, signal handling, and one-line logging."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def setup_logging(verbose: int) -> None:
    """Log to stderr as one line per event (never a traceback unless -vv)."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="hikkoshi: %(levelname)s %(name)s: %(message)s"
    )


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop (the standard loop if uvloop is unavailable)."""
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps exotic platforms working
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
