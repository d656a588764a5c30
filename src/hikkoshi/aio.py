"""Small pieces of structured concurrency every layer uses.

- :func:`background`: a task for the length of a block, owned by a TaskGroup of that block, without
  the block's own exception coming out wrapped in an ExceptionGroup;
- :func:`unwrapped`: a TaskGroup block whose failure comes out as the first real error inside it
  (callers of a migration step expect the step's error, not a group);
- :func:`within`: an awaitable with a deadline, which never swallows its caller's cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


@contextlib.asynccontextmanager
async def background(
    coro: Coroutine[Any, Any, None], name: str | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` while the block runs; cancel it (and wait for it) when the block ends.

    The block's own exception comes out as it was raised. A failure of the task itself cancels the
    block and comes out as the TaskGroup's ExceptionGroup."""
    body_error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(coro, name=name)
            try:
                yield task
            except BaseException as e:
                body_error = e
                raise
            finally:
                task.cancel()
    except BaseExceptionGroup as group:
        if body_error is not None and group.exceptions == (body_error,):
            raise body_error from body_error.__cause__
        raise


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception inside ``group`` (nested groups searched) that is not a cancellation."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for exc in g.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                walk(exc)
            else:
                leaves.append(exc)

    walk(group)
    real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
    return (real or leaves)[0]


@contextlib.asynccontextmanager
async def unwrapped() -> AsyncIterator[asyncio.TaskGroup]:
    """A TaskGroup whose failure comes out as :func:`first_error` of it."""
    try:
        async with asyncio.TaskGroup() as tg:
            yield tg
    except BaseExceptionGroup as group:
        error = first_error(group)
        raise error from error.__cause__


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``awaitable``'s result, or :class:`TimeoutError` after ``seconds``.

    Not ``asyncio.wait_for``: on Python 3.11 it returns the result, dropping the cancellation, when its
    task is cancelled just as the awaitable completes (python/cpython#86296). A loop of requests made
    that way (an agent's sampler asking a disk service for its figures every half second) could then
    not be cancelled at all, and the migration job waiting for it never ended (found by the endurance
    run: a rollback left waiting for good). ``asyncio.timeout`` tells its own cancellation from the
    caller's."""
    async with asyncio.timeout(seconds):
        return await awaitable
