"""Running a process's asyncio main: uvloop, one-line logging, expected errors as one line each."""

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


def run_reporting(
    main: Coroutine[Any, Any, int], prog: str, expected: tuple[type[BaseException], ...]
) -> int:
    """Run a command's main; expected errors (also inside task groups) become one line each and exit 2."""
    try:
        return run(main)
    except expected as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
    except BaseExceptionGroup as group:
        errors = group.subgroup(expected)
        if errors is None:
            raise
        for err in leaves(errors):
            print(f"{prog}: {err}", file=sys.stderr)
    return 2


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside nested groups."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def dump_tasks(logger: logging.Logger) -> None:
    """Log every asyncio task with the chain of awaits it is stopped in (wired to SIGUSR1 in the
    daemons: a stuck process says what it is stuck on)."""
    for task in asyncio.all_tasks():
        chain: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(chain) < 20:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                chain.append(type(awaited).__name__)
                break
            chain.append(
                f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}:{frame.f_lineno}"
            )
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        name = getattr(task.get_coro(), "__qualname__", "?")
        logger.warning("task %s (%s): %s", task.get_name(), name, " -> ".join(chain))
