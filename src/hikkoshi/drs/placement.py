"""Where a VM goes: the host that fits it and is least loaded once it is there.

A host fits when it is up, has the memory and CPU, offers the VM's CPU model, keeps the rules and sees
the VM's datastores (or one with room for its disks). Among those that fit, in this order: keep the
should rules, keep the disks where they are (memory only moves), stay in the site, then the least load
afterwards (then the least CPU and memory shares added up), then the name. Hosts are walked least
loaded first and the walk stops once ``Policy.candidates`` hosts of the best kind were seen, so a
choice among 1,000 hosts looks at a few.
New VMs (:func:`place`), evacuations and rule repairs all choose this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hikkoshi.drs.model import HostState, Snapshot, Vm, VmDisk
from hikkoshi.drs.policy import Policy
from hikkoshi.drs.state import State, Unit


@dataclass(frozen=True)
class Choice:
    """A host for a unit."""

    host: str
    stores: Mapping[str, str]
    """VM -> the datastore its disks go to (VMs whose disks stay are absent)."""
    breaks_should: bool
    load_after: float


def choose(
    state: State,
    unit: Unit,
    src: str | None,
    *,
    exclude: frozenset[str] = frozenset(),
    sites: frozenset[str] | None = None,
    may_break_should: bool = False,
) -> Choice | dict[str, str]:
    """The best host for ``unit`` (coming from ``src``), or why each host was refused. ``sites``: the
    sites it may go to (``None``: any); ``may_break_should``: as a last resort, break should rules."""
    best: tuple[tuple[bool, bool, bool, float, float, str], Choice] | None = None
    refused: dict[str, str] = {}
    home = state.hosts[src].site if src is not None else None
    # The best kind of host there can be: none breaks should rules, some see the disks (when any up
    # host sees all of the unit's datastores), in the home site. The walk stops after enough of those.
    ideal = (False, not _some_host_sees(state, unit, src), False)
    seen_ideal = 0
    for h in state.ascending():
        if h == src or h in exclude:
            continue
        host = state.hosts[h]
        if sites is not None and host.site not in sites:
            refused[h] = f"is in site {host.site}"
            continue
        why = state.refusal(unit, h)
        breaks = False
        if why is not None and may_break_should and state.refusal(unit, h, should=False) is None:
            why, breaks = None, True
        if why is not None:
            refused[h] = why
            continue
        stores = state.storage_for(unit, h)
        if stores is None:
            refused[h] = "sees no datastore with room for its disks"
            continue
        after = state.load_after(h, unit)
        # Ties on the busiest resource (a VM adding only to the other one leaves it unchanged) go to
        # the host with most room in all of them, so equal hosts take turns.
        key = (
            breaks,
            bool(stores),
            home is not None and host.site != home,
            after,
            state.total_after(h, unit),
            h,
        )
        if best is None or key < best[0]:
            best = (key, Choice(h, stores, breaks, after))
        if key[:3] == ideal:
            seen_ideal += 1
            if seen_ideal >= state.policy.candidates:
                break
    if best is not None:
        return best[1]
    for h in sorted(state.hosts):
        if h != src and h not in exclude and h not in refused:
            refused[h] = f"is {state.hosts[h].state.value}"  # the walk covers up hosts only
    return refused


def _some_host_sees(state: State, unit: Unit, src: str | None) -> bool:
    """Whether an up host other than ``src`` sees every datastore of the unit's disks."""
    stores = set().union(*(state.vms[n].datastores for n in unit.vms))
    hosts: set[str] | None = None
    for s in stores:
        ds = state.datastores.get(s)
        seeing = set(ds.hosts) if ds is not None else set()
        hosts = seeing if hosts is None else hosts & seeing
    if hosts is None:
        return True
    return any(h != src and h in state.load and state.hosts[h].state is HostState.UP for h in hosts)


def summarise(refused: Mapping[str, str]) -> str:
    """``refused`` (host -> why) in one sentence: hosts grouped by what is wrong with them."""
    if not refused:
        return "there is no other host"
    groups: dict[str, list[str]] = {}
    for h, why in sorted(refused.items()):
        groups.setdefault(why.split(" (")[0], []).append(h)
    parts = []
    for what, hosts in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        example = refused[hosts[0]]
        shown = ", ".join(hosts[:3]) + (f" and {len(hosts) - 3} more" if len(hosts) > 3 else "")
        detail = example[len(what) :] if len(hosts) == 1 else ""
        parts.append(f"{shown} {what}{detail}")
    return "; ".join(parts)


# --- new VMs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewDisk:
    name: str
    size: int
    allocated: int | None = None
    """Space it takes at first (``None``: all of its size)."""


@dataclass(frozen=True)
class NewVm:
    """A VM to create."""

    name: str
    memory: int
    cpus: int
    disks: tuple[NewDisk, ...] = ()
    datastore: str | None = None
    """The datastore its disks must be on (``None``: any the host sees, with room)."""
    cpu_model: str | None = None
    """The named guest CPU model it needs (``None``: any host's)."""
    cpu_demand: float | None = None
    """Cores it is expected to keep busy (``None``: ``Policy.new_vm_cpu`` of its vCPUs)."""


@dataclass(frozen=True)
class Placement:
    """Where a new VM goes, or why nowhere."""

    vm: str
    host: str | None
    datastore: str | None
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"vm": self.vm, "host": self.host, "datastore": self.datastore, "reason": self.reason}


def place(snap: Snapshot, new: NewVm, policy: Policy | None = None) -> Placement:
    """A host (and datastore) for ``new``: the one that fits and is least loaded once it runs there."""
    policy = policy or Policy()
    state = State(snap, policy)
    if new.name in state.vms:
        return Placement(new.name, None, None, f"a VM named {new.name} exists already")
    need = sum(d.size if d.allocated is None else d.allocated for d in new.disks)
    disks = tuple(
        VmDisk(d.name, new.datastore or "", d.size, d.size if d.allocated is None else d.allocated)
        for d in new.disks
    )
    cpu = new.cpu_demand if new.cpu_demand is not None else new.cpus * policy.new_vm_cpu
    state.add_vm(
        Vm(new.name, "", "", new.memory, new.cpus, disks, cpu_model=new.cpu_model), cpu, float(new.memory)
    )
    unit = Unit((new.name,), cpu, float(new.memory), new.memory, new.cpus)
    exclude: set[str] = set()
    if new.datastore is not None:
        ds = state.datastores.get(new.datastore)
        if ds is None:
            return Placement(new.name, None, None, f"there is no datastore {new.datastore}")
        if state.room_for(need, [new.datastore]) is None:
            return Placement(new.name, None, None, f"datastore {new.datastore} has no room for {need} bytes")
        exclude = {h for h in state.hosts if new.datastore not in state.hosts[h].datastores}
    got = choose(state, unit, None, exclude=frozenset(exclude), may_break_should=True)
    if not isinstance(got, Choice):
        refused = {h: f"does not see datastore {new.datastore}" for h in exclude}
        refused.update(got)
        return Placement(new.name, None, None, f"no host fits {new.name}: {summarise(refused)}")
    store = (new.datastore or got.stores.get(new.name)) if new.disks else None
    where = f", disks on {store}" if store else ""
    reason = (
        f"{got.host} fits {new.name} and is the least loaded that does "
        f"({got.load_after:.0%} once it runs){where}"
    )
    if got.breaks_should:
        reason += "; it breaks a should rule: no host keeping it fits"
    return Placement(new.name, got.host, store, reason)
