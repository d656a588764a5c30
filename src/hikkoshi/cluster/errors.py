"""The exceptions of the cluster layer: one type per thing a caller decides differently on."""

from __future__ import annotations

from collections.abc import Sequence


class ClusterError(Exception):
    """Base of every error this package raises on purpose."""


class EtcdUnavailable(ClusterError):
    """etcd did not answer within the deadline (all endpoints tried).

    The one exception for "the cluster's state cannot be read or changed right now". An agent that gets
    it keeps its running VMs running and starts nothing (DESIGN.md). For a write, the outcome is
    unknown: it may have been applied. Every write this package makes can be retried and recognised
    (compare-guarded, tagged with a nonce), so the callers here resolve that themselves.
    """

    def __init__(self, endpoints: Sequence[str], operation: str, detail: str) -> None:
        self.endpoints = tuple(endpoints)
        self.operation = operation
        self.detail = detail
        super().__init__(f"etcd unreachable at {', '.join(self.endpoints)} ({operation}): {detail}")


class WatchCompacted(ClusterError):
    """A watch asked for history etcd no longer has; re-read the state, then watch from its revision."""

    def __init__(self, compact_revision: int) -> None:
        self.compact_revision = compact_revision
        super().__init__(f"watch history was compacted up to revision {compact_revision}")


class LeaseLost(ClusterError):
    """A lease this process kept alive is gone (expired or revoked): keys under it were deleted."""


class EtcdProcessError(ClusterError):
    """A local etcd member could not be started, or died."""


class EtcdNotInstalled(EtcdProcessError):
    """No ``etcd`` binary on this machine."""


class PortInUse(EtcdProcessError):
    """A port an etcd member was to listen on is taken."""


class NameTaken(ClusterError):
    """A VM name is already registered in the cluster, for another VM."""

    def __init__(self, name: str, uuid: str) -> None:
        self.name = name
        self.uuid = uuid
        super().__init__(f"the VM name {name!r} is taken by VM {uuid}")


class OwnedElsewhere(ClusterError):
    """A VM's owner key is held by another host (or moved since the token the caller holds)."""

    def __init__(self, uuid: str, holder: str | None, token: int) -> None:
        self.uuid = uuid
        self.holder = holder
        self.token = token
        where = f"host {holder!r} (token {token})" if holder is not None else "nobody (no owner key)"
        super().__init__(f"VM {uuid} is owned by {where}")


class VmExists(ClusterError):
    """A VM with this uuid is already registered."""


class HostNameInUse(ClusterError):
    """Another live agent is registered under this host name."""


class NotCoordinator(ClusterError):
    """This process no longer coordinates the migration (its lease lapsed; someone may have taken over)."""


class CoordinatorAlive(ClusterError):
    """A migration's coordinator still holds its lease: it cannot be taken over."""

    def __init__(self, job_id: str, host: str) -> None:
        self.job_id = job_id
        self.host = host
        super().__init__(f"migration {job_id} is still coordinated by host {host!r}")


class JobExists(ClusterError):
    """A migration with this id is already recorded."""


class NoSuchJob(ClusterError):
    """No migration with this id is recorded."""


class LimitReached(ClusterError):
    """A migration asked not to wait would have to: the reasons say which limits and who holds them."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__("; ".join(self.reasons))
