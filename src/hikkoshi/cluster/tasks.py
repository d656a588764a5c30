"""A background task for the length of a block, owned by a TaskGroup of that block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` while the block runs; cancel it (and wait for it) when the block ends.

    The block's own exception comes out as it was raised: a TaskGroup would wrap it in an
    ExceptionGroup, which callers of a context manager do not expect. A failure of the task itself
    cancels the block and comes out as the TaskGroup's ExceptionGroup.
    """
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
