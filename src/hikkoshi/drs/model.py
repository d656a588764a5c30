"""The cluster as the planner sees it: one frozen snapshot of hosts, VMs, datastores, links, rules, limits.

Units: memory and disk sizes in bytes, rates in bytes per second, CPU in cores (demand: cores busy),
latency and RTT in milliseconds. Samples are tuples of values over the same window (oldest first), one
per measurement interval; the planner uses their mean, and their spread tells whether a load is stable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hikkoshi.drs.rules import Rule


class HostState(enum.StrEnum):
    """Whether a host takes VMs."""

    UP = "up"
    DOWN = "down"
    """Unreachable: its VMs are not the planner's to move (HA restarts them elsewhere)."""
    MAINTENANCE = "maintenance"
    """Entering or in maintenance: every VM must leave, nothing new comes."""


@dataclass(frozen=True)
class HostLoad:
    """What a host measured of itself over the window: all its VMs plus its own overhead."""

    cpu: tuple[float, ...] = ()
    """Cores busy."""
    memory: tuple[float, ...] = ()
    """Bytes in use."""


@dataclass(frozen=True)
class Host:
    """One hypervisor host."""

    name: str
    site: str
    cpu_cores: int
    cpu_model: str
    """The host's CPU (what a guest with the ``host`` CPU model sees)."""
    memory: int
    """Bytes VMs may be given (the host's own reserve already taken off)."""
    datastores: frozenset[str] = frozenset()
    state: HostState = HostState.UP
    load: HostLoad = HostLoad()
    guest_cpu_models: frozenset[str] = frozenset()
    """Named guest CPU models the host can provide besides its own."""

    def offers(self, cpu_model: str | None) -> bool:
        """Whether a guest asking for ``cpu_model`` (``None``: any) can run here."""
        return cpu_model is None or cpu_model == self.cpu_model or cpu_model in self.guest_cpu_models


@dataclass(frozen=True)
class Demand:
    """What a VM used over the window, one value per sample."""

    cpu: tuple[float, ...] = ()
    """Cores busy."""
    memory: tuple[float, ...] = ()
    """Active memory, bytes."""
    disk_read: tuple[float, ...] = ()
    """Bytes per second (Storage DRS: the VM's share of a slow datastore's I/O)."""
    disk_write: tuple[float, ...] = ()
    """Bytes per second (also what a disk copy must catch up with)."""
    network: tuple[float, ...] = ()
    """Bytes per second on the guest's own network; carried for the service, not weighed yet
    (migrations use the hosts' migration network, which the guests do not share)."""


@dataclass(frozen=True)
class VmDisk:
    """One disk of a VM."""

    name: str
    datastore: str
    size: int
    allocated: int


@dataclass(frozen=True)
class Vm:
    """One running VM."""

    name: str
    uuid: str
    host: str
    memory: int
    cpus: int
    disks: tuple[VmDisk, ...] = ()
    demand: Demand = Demand()
    dirty_rate: float = 0.0
    """Bytes per second its memory is dirtied (``calc-dirty-rate``)."""
    cpu_model: str | None = None
    """The guest's named CPU model; ``None``: the host's own, so it can only go where the CPU is the
    same as where it runs."""
    resident: int | None = None
    """Bytes of memory a migration's first pass sends (its QEMU's resident set), when known."""

    @property
    def datastores(self) -> frozenset[str]:
        return frozenset(d.datastore for d in self.disks)


@dataclass(frozen=True)
class Datastore:
    """Storage some hosts see."""

    name: str
    capacity: int
    free: int
    hosts: frozenset[str] = frozenset()
    latency_p90: tuple[float, ...] = ()
    """The I/O latency's 90th percentile per sample interval, ms."""
    copy_rate: float = 400e6
    """Bytes per second a disk move to or from it gets."""

    @property
    def used_fraction(self) -> float:
        return 1 - self.free / self.capacity if self.capacity > 0 else 1.0


@dataclass(frozen=True)
class Link:
    """The network between two sites (the same site twice: the site's own network)."""

    a: str
    b: str
    bandwidth: float
    """Bytes per second a migration stream gets."""
    rtt_ms: float
    measured: bool = False
    """Whether a migration between the two sites measured it (else it is assumed)."""


@dataclass(frozen=True)
class Limits:
    """What the cluster allows a plan to do."""

    max_moves: int = 32
    """Balancing and should-rule moves per plan; mandatory ones (maintenance, must rules) are not capped."""
    max_moves_per_host: int = 4
    """Optional moves one host takes part in, per plan (as source or destination)."""
    max_downtime_ms: int = 300
    """The downtime limit migrations get (the convergence schedule's last step)."""
    allow_postcopy: bool = False
    """Whether migrations may fall back to post-copy RAM."""
    max_migration_s: float = 3600.0
    """A move predicted to take longer is never recommended."""
    concurrent_per_host: int = 2
    """Migrations a host runs at once (the simulator's schedule)."""


@dataclass(frozen=True)
class StoppedVm:
    """A powered-off VM registered on a host: no load, outside balancing; a host entering maintenance
    sends it away all the same (an offline migration), where it may start again."""

    vm: Vm
    rules: tuple[Rule, ...] = ()
    """The run-on and not-run-on rules naming it (where it may start); VM-VM rules count once it runs."""


@dataclass(frozen=True)
class Snapshot:
    """The whole cluster at one moment."""

    hosts: tuple[Host, ...]
    vms: tuple[Vm, ...]
    datastores: tuple[Datastore, ...] = ()
    links: tuple[Link, ...] = ()
    rules: tuple[Rule, ...] = ()
    limits: Limits = field(default_factory=Limits)
    stopped: tuple[StoppedVm, ...] = ()
    """Powered-off VMs (maintenance moves them; nothing else does)."""


def problems(s: Snapshot) -> list[str]:
    """What makes the snapshot inconsistent (the planner refuses it): duplicate names, VMs on unknown
    hosts, disks on unknown datastores, rules naming unknown VMs or hosts, sites without a link."""
    out: list[str] = []
    hosts = {h.name for h in s.hosts}
    vms = {v.name for v in s.vms}
    stores = {d.name for d in s.datastores}
    for kind, names, count in (
        ("host", hosts, len(s.hosts)),
        ("VM", vms, len(s.vms)),
        ("datastore", stores, len(s.datastores)),
    ):
        if len(names) != count:
            out.append(f"duplicate {kind} names")
    off = [x.vm.name for x in s.stopped]
    if len(set(off)) != len(off) or vms & set(off):
        out.append("duplicate VM names (a powered-off VM is also listed running, or twice)")
    for x in s.stopped:
        out += [
            f"rule {r.name} of powered-off VM {x.vm.name} is not a host rule" for r in x.rules if not r.hosts
        ]
    for v in (*s.vms, *(x.vm for x in s.stopped)):
        if v.host not in hosts:
            out.append(f"VM {v.name} is on unknown host {v.host}")
        out += [
            f"VM {v.name}: disk on unknown datastore {d.datastore}"
            for d in v.disks
            if d.datastore not in stores
        ]
    sees = {(h.name, d) for h in s.hosts for d in h.datastores}
    said = {(h, d.name) for d in s.datastores for h in d.hosts}
    out += [f"host {h} and datastore {d} disagree on whether {h} sees {d}" for h, d in sorted(sees ^ said)]
    for r in s.rules:
        out += [f"rule {r.name}: unknown VM {n}" for n in sorted(r.vms - vms)]
        out += [f"rule {r.name}: unknown host {n}" for n in sorted(r.hosts - hosts)]
    linked = {frozenset((k.a, k.b)) for k in s.links}
    sites = sorted({h.site for h in s.hosts})
    out += [
        f"no link between sites {a} and {b}"
        for i, a in enumerate(sites)
        for b in sites[i + 1 :]
        if frozenset((a, b)) not in linked
    ]
    return out
