"""The key schema: every etcd key hikkoshi uses, in one place. Pure.

Under one root (``/hikkoshi`` by default; tests use a root of their own):

| key | value (``models``) | lease |
|---|---|---|
| ``hosts/<host>`` | :class:`HostInfo`: addresses, datastores, CPU, memory | none: a down host stays listed |
| ``live/<host>`` | :class:`HostStatus`: free memory and space, load | the host's: gone = host down |
| ``maintenance/<host>`` | :class:`Maintenance`: why, since when | none |
| ``vms/<uuid>`` | :class:`VmRecord`: name, size | none |
| ``names/<vm-name>`` | the VM's uuid (text): names are unique cluster-wide | none |
| ``owners/<uuid>`` | :class:`Owner`: the host that runs it; its mod revision is the fencing token | none |
| ``migrations/<id>`` | :class:`JobRecord`: phase, source, destination | none |
| ``coordinators/<id>`` | :class:`Coordinator`: the host coordinating the migration | the migration's |
| ``slots/<resource>/<id>`` | :class:`SlotHolder`: a migration holding a slot of it | the migration's |
| ``queue/<id>`` | :class:`QueueEntry`: a migration waiting (FIFO by create revision) | the migration's |
| ``limits`` | :class:`Limits`: slots per resource kind, and overrides | none |
| ``rules/<name>`` | :class:`RuleRecord`: a DRS placement rule | none |
| ``schedules/<id>`` | :class:`ScheduleRecord`: a migration at a time, and what became of it | none |
| ``drs`` | :class:`DrsSettings`: the automatic planner's switch, level, interval | none |
| ``leader/drs`` | the host running the automatic planner (text) | the leader's |
| ``drs-runs/<id>`` | :class:`DrsRunRecord`: an automatic planner run: what it saw, what it handed on | none |
| ``links/<site>,<site>`` | :class:`LinkRecord`: two sites' link as a migration measured it | none |
| ``observations/<id>`` | :class:`ObservationRecord`: a done migration's inputs and figures | none |

Load figures travel in ``live/<host>`` (:attr:`HostStatus.vm_loads`: each VM's recent window).

Names that end up in keys (hosts, VM names, ids, resources) never contain ``/``: a prefix read of
``hosts/`` must not see another level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=,~-]{0,252}$")


def segment(value: str, what: str = "name") -> str:
    """``value`` if it can be one key segment (no ``/``, no spaces, not empty), else ValueError."""
    if not _SEGMENT.match(value):
        raise ValueError(f"{what} {value!r} cannot be used in the cluster (letters, digits, ._:@+=,~- only)")
    return value


@dataclass(frozen=True)
class Keys:
    """The key schema under ``root``."""

    root: str = "/hikkoshi"

    def __post_init__(self) -> None:
        if not self.root.startswith("/") or self.root.endswith("/"):
            raise ValueError(f"a key root starts with '/' and does not end with one: {self.root!r}")

    def _p(self, kind: str) -> str:
        return f"{self.root}/{kind}/"

    # hosts
    @property
    def hosts(self) -> str:
        return self._p("hosts")

    def host(self, name: str) -> str:
        return self.hosts + segment(name, "host name")

    @property
    def live_hosts(self) -> str:
        return self._p("live")

    def live(self, name: str) -> str:
        return self.live_hosts + segment(name, "host name")

    @property
    def maintenances(self) -> str:
        return self._p("maintenance")

    def maintenance(self, name: str) -> str:
        return self.maintenances + segment(name, "host name")

    # VMs
    @property
    def vms(self) -> str:
        return self._p("vms")

    def vm(self, uuid: str) -> str:
        return self.vms + segment(uuid, "VM uuid")

    @property
    def names(self) -> str:
        return self._p("names")

    def name(self, vm_name: str) -> str:
        return self.names + segment(vm_name, "VM name")

    @property
    def owners(self) -> str:
        return self._p("owners")

    def owner(self, uuid: str) -> str:
        return self.owners + segment(uuid, "VM uuid")

    # migrations
    @property
    def migrations(self) -> str:
        return self._p("migrations")

    def migration(self, job_id: str) -> str:
        return self.migrations + segment(job_id, "migration id")

    @property
    def coordinators(self) -> str:
        return self._p("coordinators")

    def coordinator(self, job_id: str) -> str:
        return self.coordinators + segment(job_id, "migration id")

    # limits
    @property
    def slots(self) -> str:
        return self._p("slots")

    def slots_of(self, resource: str) -> str:
        return f"{self.slots}{segment(resource, 'resource')}/"

    def slot(self, resource: str, job_id: str) -> str:
        return self.slots_of(resource) + segment(job_id, "migration id")

    @property
    def queue(self) -> str:
        return self._p("queue")

    def queued(self, job_id: str) -> str:
        return self.queue + segment(job_id, "migration id")

    @property
    def limits(self) -> str:
        return f"{self.root}/limits"

    # DRS
    @property
    def rules(self) -> str:
        return self._p("rules")

    def rule(self, name: str) -> str:
        return self.rules + segment(name, "rule name")

    @property
    def schedules(self) -> str:
        return self._p("schedules")

    def schedule(self, schedule_id: str) -> str:
        return self.schedules + segment(schedule_id, "schedule id")

    @property
    def drs(self) -> str:
        return f"{self.root}/drs"

    @property
    def drs_leader(self) -> str:
        return f"{self.root}/leader/drs"

    @property
    def drs_runs(self) -> str:
        return self._p("drs-runs")

    def drs_run(self, run_id: str) -> str:
        return self.drs_runs + segment(run_id, "run id")

    # links
    @property
    def links(self) -> str:
        return self._p("links")

    def link(self, a: str, b: str) -> str:
        """The link between sites ``a`` and ``b`` (either order; the same site twice: its own network)."""
        first, second = sorted((segment(a, "site"), segment(b, "site")))
        return f"{self.links}{first},{second}"

    # observations
    @property
    def observations(self) -> str:
        return self._p("observations")

    def observation(self, job_id: str) -> str:
        return self.observations + segment(job_id, "migration id")

    @staticmethod
    def last(key: str) -> str:
        """The last segment of a key: the host name, uuid or id it is about."""
        return key.rsplit("/", 1)[-1]
