"""The cluster as DRS sees it: etcd's records (hosts with their load windows, VMs and owners, rules)
turned into a :class:`hikkoshi.drs.model.Snapshot`. Pure.

- A host's capacity is what its agent publishes (``HostStatus.cpu_cores``, ``vm_memory``), else its
  whole memory and one core; its load is the sum of its VMs' demand (what each VM measured over the
  window: QEMU's CPU time, resident memory, its NBD service's I/O rates).
- A datastore is one per uuid, seen by every host that lists it; its free space is the least any of
  them reports; its latency per sample is the p90 over its VMs' requests in the interval, as each host
  publishes it (the highest of the hosts that use it); from a host that publishes none, the slowest
  of its VMs' p99 (which bounds the p90 from above).
- Only running VMs whose owner is up or in maintenance are the planner's; a VM's disks are on the
  datastore its owner says (else the one its record names, else the owner's first). Powered-off VMs
  are listed apart (``Snapshot.stopped``, with their host rules): maintenance moves them, nothing else.
- A rule keeps the VMs of it that are in the snapshot (a stopped VM is placed when it starts).
- Links are what the last migration between two sites measured (``links/``); sites get an assumed
  one between them (``WAN``) where none was measured yet, and a site's own network is the policy's LAN
  until a migration within it measured it.
- A VM's dirty rate is the last its host measured (``calc-dirty-rate``), else 0: an idle guest's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hikkoshi.cluster.host_view import HostState as ClusterHostState
from hikkoshi.cluster.host_view import HostView
from hikkoshi.cluster.models import LinkRecord, RuleRecord, VmLoad
from hikkoshi.drs.model import (
    Datastore,
    Demand,
    Host,
    HostState,
    Limits,
    Link,
    Snapshot,
    StoppedVm,
    Vm,
    VmDisk,
)
from hikkoshi.drs.rules import Rule, RuleKind, Strength

WAN = (12.5e6, 50.0)
"""Bandwidth (bytes/s) and RTT (ms) assumed between two sites (100 Mbit/s, 50 ms)."""
RUNNING = "running"
STOPPED = "stopped"


@dataclass(frozen=True)
class ClusterVm:
    """A VM as etcd records it, with its owner (``Ownership.list_vms``' rows, flattened)."""

    name: str
    uuid: str
    owner: str | None
    memory: int
    vcpus: int
    disk_bytes: int
    datastore: str | None


def _state(view: HostView) -> HostState:
    if view.state is ClusterHostState.DOWN:
        return HostState.DOWN
    if view.state is ClusterHostState.MAINTENANCE:
        return HostState.MAINTENANCE
    return HostState.UP


def host_of(view: HostView) -> Host:
    st = view.status
    info = view.info
    cores = st.cpu_cores if st is not None and st.cpu_cores > 0 else 1
    memory = st.vm_memory if st is not None and st.vm_memory > 0 else info.memory_total
    return Host(
        name=info.name,
        site=info.site,
        cpu_cores=cores,
        cpu_model=info.cpu_model,
        memory=memory,
        datastores=frozenset(d.uuid for d in info.datastores),
        state=_state(view),
    )


def _merge(have: list[float], mine: Iterable[float]) -> None:
    """``have`` becomes the per-sample maximum of itself and ``mine`` (aligned on the newest sample)."""
    values = list(mine)
    if len(values) > len(have):
        have[:0] = [0.0] * (len(values) - len(have))
    offset = len(have) - len(values)
    for i, x in enumerate(values):
        have[offset + i] = max(have[offset + i], x)


def latencies(views: Iterable[HostView]) -> dict[str, tuple[float, ...]]:
    """Datastore uuid -> per sample (newest last): the p90 its hosts publish, else the slowest p99 of
    its VMs on hosts that publish none."""
    out: dict[str, list[float]] = {}
    for v in views:
        if v.status is None:
            continue
        published = v.status.datastore_latency_p90
        for store, window in published.items():
            _merge(out.setdefault(store, []), window)
        for got in v.status.vm_loads.values():
            if got.datastore and got.disk_latency_ms and got.datastore not in published:
                _merge(out.setdefault(got.datastore, []), got.disk_latency_ms)
    return {k: tuple(v) for k, v in out.items()}


def datastores_of(views: Sequence[HostView]) -> tuple[Datastore, ...]:
    capacity: dict[str, int] = {}
    free: dict[str, int] = {}
    seen: dict[str, set[str]] = {}
    for v in views:
        for d in v.info.datastores:
            capacity[d.uuid] = max(capacity.get(d.uuid, 0), d.capacity)
            seen.setdefault(d.uuid, set()).add(v.info.name)
            if v.status is not None and d.uuid in v.status.datastores_free:
                got = v.status.datastores_free[d.uuid]
                free[d.uuid] = min(free.get(d.uuid, got), got)
    slow = latencies(views)
    return tuple(
        Datastore(
            u, capacity[u], min(free.get(u, capacity[u]), capacity[u]), frozenset(seen[u]), slow.get(u, ())
        )
        for u in sorted(capacity)
    )


def vm_of(vm: ClusterVm, owner: HostView, measured: VmLoad | None) -> Vm:
    """``vm`` as the planner sees it, on ``owner``, with what it measured."""
    got = measured or VmLoad()
    stores = [d.uuid for d in owner.info.datastores]
    home = vm.datastore if vm.datastore in stores else None
    store = got.datastore or home or (stores[0] if stores else "")
    memory = tuple(float(min(m, vm.memory)) for m in got.memory) or (float(vm.memory),)
    allocated = got.disk_allocated or vm.disk_bytes
    disks = (VmDisk("disks", store, vm.disk_bytes, min(allocated, vm.disk_bytes)),) if store else ()
    return Vm(
        name=vm.name,
        uuid=vm.uuid,
        host=owner.info.name,
        memory=vm.memory,
        cpus=vm.vcpus,
        disks=disks,
        demand=Demand(
            cpu=got.cpu,
            memory=memory,
            disk_read=got.disk_read,
            disk_write=got.disk_write,
            network=got.network,
        ),
        dirty_rate=got.dirty_rate or 0.0,
        resident=min(got.memory[-1], vm.memory) if got.memory else None,
    )


def rule_of(r: RuleRecord, known: set[str]) -> Rule | None:
    """The stored rule over the VMs in the snapshot; None when none of them is (or it cannot matter)."""
    vms = frozenset(n for n in r.vms if n in known)
    kind = RuleKind(r.kind)
    if not vms or (kind in (RuleKind.AFFINITY, RuleKind.ANTI_AFFINITY) and len(vms) < 2):
        return None
    return Rule(r.name, kind, vms, frozenset(r.hosts), Strength(r.strength))


def snapshot(
    hosts: Sequence[HostView],
    vms: Iterable[ClusterVm],
    rules: Iterable[RuleRecord] = (),
    *,
    limits: Limits | None = None,
    measured: Iterable[LinkRecord] = (),
) -> Snapshot:
    """The cluster as the planner sees it (see the module's docstring)."""
    by_name = {h.info.name: h for h in hosts}
    out_vms: list[Vm] = []
    off: list[Vm] = []
    for vm in sorted(vms, key=lambda v: v.name):
        owner = by_name.get(vm.owner or "")
        if owner is None or owner.status is None:
            continue
        state = owner.status.vms.get(vm.uuid)
        if state == RUNNING:
            out_vms.append(vm_of(vm, owner, owner.status.vm_loads.get(vm.uuid)))
        elif state == STOPPED:
            off.append(vm_of(vm, owner, None))
    known = {v.name for v in out_vms}
    host_names = set(by_name)
    out_rules = []
    stored = [r.model_copy(update={"hosts": tuple(h for h in r.hosts if h in host_names)}) for r in rules]
    for r in stored:
        rule = rule_of(r, known)
        if rule is not None and (rule.hosts or rule.kind in (RuleKind.AFFINITY, RuleKind.ANTI_AFFINITY)):
            out_rules.append(rule)
    stopped = tuple(StoppedVm(v, _host_rules(stored, v.name)) for v in off)
    sites = sorted({h.info.site for h in hosts})
    known_sites = set(sites)
    got = {
        frozenset((m.a, m.b)): Link(m.a, m.b, m.bandwidth, m.rtt_ms, measured=True)
        for m in measured
        if m.a in known_sites and m.b in known_sites
    }
    assumed = {frozenset((a, b)): Link(a, b, *WAN) for i, a in enumerate(sites) for b in sites[i + 1 :]}
    links = tuple(sorted({**assumed, **got}.values(), key=lambda k: (k.a, k.b)))
    return Snapshot(
        hosts=tuple(host_of(h) for h in sorted(hosts, key=lambda h: h.info.name)),
        vms=tuple(out_vms),
        datastores=datastores_of(hosts),
        links=links,
        rules=tuple(out_rules),
        limits=limits or Limits(),
        stopped=stopped,
    )


def _host_rules(rules: Iterable[RuleRecord], vm: str) -> tuple[Rule, ...]:
    """The run-on and not-run-on rules naming ``vm`` (over the hosts the cluster knows)."""
    out = []
    for r in rules:
        rule = rule_of(r, {vm})
        if rule is not None and rule.hosts:
            out.append(rule)
    return tuple(out)
