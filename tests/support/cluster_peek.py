"""What etcd says, read (and, for tests that play another host, written) synchronously from a test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.host_view import HostView
from hikkoshi.cluster.hosts import list_hosts
from hikkoshi.cluster.jobs import Jobs, JobView
from hikkoshi.cluster.limits import Slots
from hikkoshi.cluster.models import Limits
from hikkoshi.cluster.ownership import Claim, Ownership
from hikkoshi.cluster.store import Store

T = TypeVar("T")


class ClusterPeek:
    """One etcd (the agents' default key root), read and written from a test."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.config = EtcdConfig(tuple(endpoints), attempt_timeout=2.0, deadline=20.0)

    def _run(self, body: Callable[[Store], Awaitable[T]]) -> T:
        async def main() -> T:
            async with Store(self.config) as store:
                return await body(store)

        return asyncio.run(main())

    def owner(self, uuid: str) -> Claim | None:
        return self._run(lambda s: Ownership(s).owner(uuid))

    def move_owner(self, uuid: str, to_host: str) -> Claim:
        """Move the owner key as another host's migration would (from whoever holds it now)."""

        async def body(store: Store) -> Claim:
            own = Ownership(store)
            current = await own.owner(uuid)
            assert current is not None, f"VM {uuid} has no owner key"
            return await own.move(current, to_host)

        return self._run(body)

    def job(self, job_id: str) -> JobView:
        return self._run(lambda s: Jobs(s).get(job_id))

    def jobs(self) -> list[JobView]:
        return self._run(lambda s: Jobs(s).list())

    def hosts(self) -> dict[str, HostView]:
        async def body(store: Store) -> dict[str, HostView]:
            return {h.info.name: h for h in await list_hosts(store)}

        return self._run(body)

    def set_limits(self, **limits: int) -> None:
        self._run(lambda s: Slots(s).set_limits(Limits.model_validate(limits)))

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        """Poll ``check`` until it holds (AssertionError naming ``what`` after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}")
