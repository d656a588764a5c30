"""Small clusters for the DRS tests: builders for hand-written cases and a hypothesis strategy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from hypothesis import strategies as st

from hikkoshi.drs.model import (
    Datastore,
    Demand,
    Host,
    HostLoad,
    HostState,
    Limits,
    Link,
    Snapshot,
    Vm,
    VmDisk,
)
from hikkoshi.drs.policy import Policy
from hikkoshi.drs.rules import Rule, RuleKind, Strength
from hikkoshi.drs.state import State

GIB = 1 << 30
MIB = 1 << 20
TIB = 1 << 40
SAMPLES = 6


def host(
    name: str,
    *,
    site: str = "east",
    cores: int = 32,
    memory: int = 128 * GIB,
    model: str = "EPYC",
    datastores: Sequence[str] = ("east-san",),
    state: HostState = HostState.UP,
) -> Host:
    return Host(name, site, cores, model, memory, frozenset(datastores), state)


def vm(
    name: str,
    on: str,
    *,
    cpu: float = 2.0,
    memory: int = 4 * GIB,
    cpus: int = 4,
    datastore: str = "east-san",
    disk: int = 20 * GIB,
    noise: float = 0.0,
    dirty: float = 20 * MIB,
    model: str | None = "EPYC",
) -> Vm:
    """A VM busy at ``cpu`` cores (alternating +-``noise`` of it per sample), half its memory active."""
    samples = tuple(cpu * (1 + (noise if i % 2 else -noise)) for i in range(SAMPLES))
    return Vm(
        name=name,
        uuid=f"uuid-{name}",
        host=on,
        memory=memory,
        cpus=cpus,
        disks=(VmDisk("disk0", datastore, disk * 2, disk),),
        demand=Demand(
            cpu=samples,
            memory=(memory / 2,) * SAMPLES,
            disk_read=(MIB,) * SAMPLES,
            disk_write=(MIB,) * SAMPLES,
            network=(MIB,) * SAMPLES,
        ),
        dirty_rate=dirty,
        cpu_model=model,
    )


def snapshot(
    hosts: Sequence[Host],
    vms: Sequence[Vm],
    *,
    rules: Sequence[Rule] = (),
    limits: Limits | None = None,
    datastores: Sequence[Datastore] | None = None,
    links: Sequence[Link] = (),
) -> Snapshot:
    """The cluster; datastores (10 TiB, 5 ms) made for the names the hosts see, unless given."""
    if datastores is None:
        names = sorted({d for h in hosts for d in h.datastores})
        datastores = [
            Datastore(
                n,
                10 * TIB,
                10 * TIB - sum(d.allocated for v in vms for d in v.disks if d.datastore == n),
                frozenset(h.name for h in hosts if n in h.datastores),
                (5.0,) * SAMPLES,
            )
            for n in names
        ]
    return Snapshot(
        tuple(hosts), tuple(vms), tuple(datastores), tuple(links), tuple(rules), limits or Limits()
    )


def measured(s: Snapshot, overhead: float = 0.5) -> Snapshot:
    """``s`` with every host's load samples: its VMs' samples plus a constant overhead."""
    hosts = []
    for h in s.hosts:
        mine = [v for v in s.vms if v.host == h.name]
        cpu = tuple(overhead + sum(v.demand.cpu[i] for v in mine) for i in range(SAMPLES))
        mem = tuple(GIB + sum(v.demand.memory[i] for v in mine) for i in range(SAMPLES))
        hosts.append(replace(h, load=HostLoad(cpu, mem)))
    return replace(s, hosts=tuple(hosts))


# --- hypothesis ------------------------------------------------------------------------------------------


@st.composite
def clusters(
    draw: st.DrawFn,
    *,
    max_hosts: int = 7,
    max_vms: int = 40,
    states: bool = False,
    kept_rules: bool = True,
    host_samples: bool | None = None,
) -> Snapshot:
    """Random clusters that fit their hosts. ``states``: some hosts down or in maintenance;
    ``kept_rules``: rules drawn from where the VMs are, so none is broken (else any rules)."""
    n = draw(st.integers(2, max_hosts))
    two_sites = draw(st.booleans())
    hosts = []
    for i in range(n):
        site = "west" if two_sites and i % 3 == 2 else "east"
        state = HostState.UP
        if states and i > 0:
            state = draw(st.sampled_from([HostState.UP, HostState.UP, HostState.MAINTENANCE, HostState.DOWN]))
        hosts.append(
            host(
                f"h{i}",
                site=site,
                cores=draw(st.sampled_from([8, 16, 32])),
                memory=draw(st.sampled_from([32, 64, 128])) * GIB,
                model=draw(st.sampled_from(["EPYC", "EPYC", "EPYC", "XEON"])),
                datastores=(f"{site}-san", f"h{i}-local"),
                state=state,
            )
        )
    by_name = {h.name: h for h in hosts}
    used_cpu = dict.fromkeys(by_name, 0.5)
    used_mem = dict.fromkeys(by_name, 0)
    vms = []
    for j in range(draw(st.integers(0, max_vms))):
        on = draw(st.sampled_from(sorted(by_name)))
        h = by_name[on]
        cpus = draw(st.sampled_from([1, 2, 4]))
        cpu = draw(st.floats(0.05, 1.0)) * cpus
        memory = draw(st.sampled_from([1, 2, 4, 8])) * GIB
        if used_cpu[on] + cpu > h.cpu_cores or used_mem[on] + memory > h.memory or cpus > h.cpu_cores:
            continue
        used_cpu[on] += cpu
        used_mem[on] += memory
        store = draw(st.sampled_from(sorted(h.datastores)))
        v = vm(
            f"vm{j}",
            on,
            cpu=cpu,
            memory=memory,
            cpus=cpus,
            datastore=store,
            disk=draw(st.sampled_from([5, 10, 20])) * GIB,
            noise=draw(st.sampled_from([0.0, 0.0, 0.05, 0.6])),
            dirty=draw(st.floats(0, 300)) * MIB,
            model=draw(st.sampled_from([None, h.cpu_model])),
        )
        vms.append(v)
    rules = draw(_rules(vms, hosts, kept_rules))
    links = [Link("east", "west", 125e6, 30.0)] if two_sites else []
    s = snapshot(hosts, vms, rules=rules, links=links, limits=Limits(max_moves=draw(st.integers(1, 12))))
    if host_samples is None:
        host_samples = draw(st.booleans())
    return measured(s) if host_samples else s


@st.composite
def _rules(draw: st.DrawFn, vms: list[Vm], hosts: list[Host], kept: bool) -> list[Rule]:
    rules: list[Rule] = []
    names = [v.name for v in vms]
    where = {v.name: v.host for v in vms}
    for i in range(draw(st.integers(0, 4)) if len(names) >= 2 else 0):
        kind = draw(st.sampled_from(list(RuleKind)))
        strength = draw(st.sampled_from(list(Strength)))
        members = draw(st.lists(st.sampled_from(names), min_size=2, max_size=4, unique=True))
        hs: frozenset[str] = frozenset()
        if kind in (RuleKind.RUN_ON, RuleKind.NOT_RUN_ON):
            hs = frozenset(draw(st.lists(st.sampled_from([h.name for h in hosts]), min_size=1, unique=True)))
        if kept:
            if kind is RuleKind.AFFINITY:
                members = [m for m in members if where[m] == where[members[0]]]
            elif kind is RuleKind.ANTI_AFFINITY:
                seen: dict[str, str] = {}
                for m in members:
                    seen.setdefault(where[m], m)
                members = sorted(seen.values())
            elif kind is RuleKind.RUN_ON:
                hs = hs | {where[m] for m in members}
            else:
                hs = hs - {where[m] for m in members}
            if len(members) < 2 or (kind in (RuleKind.RUN_ON, RuleKind.NOT_RUN_ON) and not hs):
                continue
        rules.append(Rule(f"r{i}", kind, frozenset(members), hs, strength))
    return rules


def loads(s: Snapshot, policy: Policy | None = None) -> State:
    """The planner's view of ``s``: loads, imbalance, capacities."""
    return State(s, policy or Policy())
