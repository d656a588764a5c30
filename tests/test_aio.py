"""The structured-concurrency helpers every layer uses (``hikkoshi/aio.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from hikkoshi.aio import within


def _cancel_honoured(call: Callable[[Awaitable[int], float], Awaitable[int]], steps: int) -> bool:
    """A loop of quick requests through ``call``, cancelled after ``steps`` turns of the event loop:
    whether the loop ended cancelled (rather than going on as if nothing was asked)."""

    async def scenario() -> bool:
        stop = False

        async def request() -> int:
            await asyncio.sleep(0)
            return 1

        async def loop() -> None:
            while not stop:
                await call(request(), 5)

        task = asyncio.create_task(loop())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1)
        stop = True
        if not done:
            await task
            return False
        return task.cancelled()

    return asyncio.run(scenario())


def test_within_never_swallows_a_cancellation() -> None:
    # Cancelled at every point of a request's life, also just as it completes: asyncio.wait_for on
    # Python 3.11 returns the result then, and an agent's sampler loop could never be cancelled (its
    # migration job waited for it for good; the endurance run's finding).
    assert all(_cancel_honoured(within, steps) for steps in range(16))


def test_within_times_out() -> None:
    async def slow() -> Any:
        await asyncio.sleep(10)

    with pytest.raises(TimeoutError):
        asyncio.run(within(slow(), 0.05))
    assert asyncio.run(within(asyncio.sleep(0, "x"), 1)) == "x"
