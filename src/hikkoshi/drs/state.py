"""The planner's working copy of a snapshot: where every VM is, each host's load, the imbalance.

A plan is found by trying moves on this copy and applying the ones kept. Trying a move is O(1): the
imbalance is kept as the sum and the sum of squares of the balanced hosts' loads, so a move changes two
terms of each. Applying one updates the same sums, the hosts' VM sets and the hosts sorted by load.
Everything iterates in sorted order, so the same snapshot always gives the same plan.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from hikkoshi.drs import load
from hikkoshi.drs.model import Host, HostState, Snapshot, Vm
from hikkoshi.drs.policy import Policy
from hikkoshi.drs.rules import Rule, RuleKind, Strength, allows


@dataclass(frozen=True)
class Unit:
    """VMs that move together: a must-affinity group, or a single VM."""

    vms: tuple[str, ...]
    cpu: float
    """Cores busy (mean over the window)."""
    memory: float
    """Active bytes (mean over the window)."""
    allocated: int
    """Configured memory, bytes."""
    cpus: int
    """The largest VM's vCPUs (a host needs at least as many cores)."""

    @property
    def name(self) -> str:
        return self.vms[0] if len(self.vms) == 1 else "+".join(self.vms)


Target = tuple[float, float, float, float, float]
"""A destination as :meth:`State.gains` reads it: CPU busy, 1/cores (0: out of the balance), active
memory, 1/memory, load."""


class State:
    """Mutable, internal to one planning call.

    A host's load is what it measured over the window (its VMs and its own overhead), or without
    samples the sum of its VMs' demand; a move shifts it by the VM's own mean demand. Normalised: CPU
    busy over cores, active memory over memory, whichever is higher. Capacity is checked on configured
    memory (no overcommit by default) and CPU demand.
    """

    def __init__(self, snap: Snapshot, policy: Policy) -> None:
        self.snap = snap
        self.policy = policy
        self.hosts: dict[str, Host] = {h.name: h for h in snap.hosts}
        self.vms: dict[str, Vm] = {v.name: v for v in snap.vms}
        self.host_of: dict[str, str] = {v.name: v.host for v in snap.vms}
        self._vm_cpu: dict[str, float] = {}
        self._vm_mem: dict[str, float] = {}
        self.on: dict[str, set[str]] = {h.name: set() for h in snap.hosts}
        alloc = dict.fromkeys(self.hosts, 0)
        on = self.on
        for v in snap.vms:  # 30,000 VMs at the benchmark's scale: kept lean
            alloc[v.host] += v.memory
            on[v.host].add(v.name)
        cpu: dict[str, float] = {}
        mem: dict[str, float] = {}
        for h in snap.hosts:
            # A host's load is what it measured (its VMs and its own overhead); without samples, the
            # sum of its VMs' demand. VMs' own demand is read only for the VMs a move is tried with.
            name, measured = h.name, h.load
            cpu[name] = load.mean(measured.cpu) if measured.cpu else math.fsum(map(self.cpu_of, on[name]))
            mem[name] = (
                load.mean(measured.memory) if measured.memory else math.fsum(map(self.mem_of, on[name]))
            )
        self.cpu, self.mem, self.alloc = cpu, mem, alloc
        self.load = {n: self._load(n, 0.0, 0.0) for n in self.hosts}
        self.balanced = sorted(h.name for h in snap.hosts if h.state is HostState.UP)
        self._balanced = set(self.balanced)
        self.n = len(self.balanced)
        self.sum = math.fsum(self.load[n] for n in self.balanced)
        self.sum_sq = math.fsum(self.load[n] ** 2 for n in self.balanced)
        self.by_load = sorted((self.load[n], n) for n in self.balanced)
        self.ds_free = {d.name: d.free for d in snap.datastores}
        self.datastores = {d.name: d for d in snap.datastores}
        self.rules_of: dict[str, list[Rule]] = {}
        for r in snap.rules:
            for n in sorted(r.vms):
                self.rules_of.setdefault(n, []).append(r)
        self.group_of = _affinity_groups(snap.rules)
        self._stable: dict[str, bool] = {}
        self.touched: set[str] = set()
        """VMs a move of this plan already takes (no second move for them in the same plan)."""
        self._units: dict[str, list[Unit]] = {}
        self._movable: dict[str, list[Unit]] = {}
        self.version = dict.fromkeys(self.hosts, 0)
        """Per host, how many times its load changed (what was scored against an older one is stale)."""
        self.epoch = 0
        """How many moves were applied."""

    def cpu_of(self, vm: str) -> float:
        """The VM's CPU demand: cores busy, the mean over the window."""
        found = self._vm_cpu.get(vm)
        if found is None:
            found = self._vm_cpu[vm] = load.mean(self.vms[vm].demand.cpu)
        return found

    def mem_of(self, vm: str) -> float:
        """The VM's active memory, the mean over the window."""
        found = self._vm_mem.get(vm)
        if found is None:
            found = self._vm_mem[vm] = load.mean(self.vms[vm].demand.memory)
        return found

    def add_vm(self, vm: Vm, cpu: float, memory: float) -> None:
        """Know a VM that is not running yet (a new one to place), with its expected demand."""
        self.vms[vm.name] = vm
        self._vm_cpu[vm.name], self._vm_mem[vm.name] = cpu, memory

    # --- loads ------------------------------------------------------------------------------------------

    def _load(self, h: str, dcpu: float, dmem: float) -> float:
        host = self.hosts[h]
        return load.normalised(self.cpu[h] + dcpu, host.cpu_cores, self.mem[h] + dmem, host.memory)

    def imbalance(self) -> float:
        """The standard deviation of the balanced (up) hosts' normalised loads."""
        if self.n == 0:
            return 0.0
        return math.sqrt(max(0.0, self.sum_sq - self.sum * self.sum / self.n) / self.n)

    def gain(self, src: str | None, dst: str, cpu: float, mem: float) -> float:
        """How much moving ``cpu``/``mem`` from ``src`` (``None``: a new VM) to ``dst`` lowers the sum of
        squared deviations of the balanced hosts' loads; hosts out of the balance (maintenance) count 0."""
        return self.gains(src, cpu, mem, self.targets((dst,)))[0]

    def targets(self, dsts: Sequence[str]) -> list[Target]:
        """What :meth:`gains` needs of each destination, read once: CPU busy, 1/cores, active memory,
        1/memory, load (a host out of the balance gets no 1/cores: it does not count)."""
        out = []
        for d in dsts:
            h = self.hosts[d]
            balanced = d in self._balanced
            out.append(
                (self.cpu[d], 1 / h.cpu_cores if balanced else 0.0, self.mem[d], 1 / h.memory, self.load[d])
            )
        return out

    def gains(self, src: str | None, cpu: float, mem: float, dsts: Sequence[Target]) -> list[float]:
        """:meth:`gain` for each destination (as :meth:`targets` gives them). The hot loop of balancing,
        a few thousand candidates per move: the source's part is computed once, the rest is arithmetic."""
        if self.n == 0:
            return [0.0] * len(dsts)
        s_sum = s_sq = 0.0
        if src is not None and src in self._balanced:
            old, new = self.load[src], self._load(src, -cpu, -mem)
            s_sum, s_sq = new - old, new * new - old * old
        total, sq, n = self.sum, self.sum_sq, self.n
        before = sq - total * total / n
        out = []
        for d_cpu, inv_cores, d_mem, inv_mem, old in dsts:
            if inv_cores:
                c = (d_cpu + cpu) * inv_cores
                m = (d_mem + mem) * inv_mem
                new = c if c > m else m
                d_sum = s_sum + new - old
                d_sq = s_sq + new * new - old * old
            else:
                d_sum, d_sq = s_sum, s_sq
            out.append(before - (sq + d_sq - (total + d_sum) ** 2 / n))
        return out

    def load_after(self, h: str, unit: Unit) -> float:
        return self._load(h, unit.cpu, unit.memory)

    def total_after(self, h: str, unit: Unit) -> float:
        """CPU share plus memory share of ``h`` with ``unit`` on it (a tie-breaker for equal loads)."""
        host = self.hosts[h]
        return (self.cpu[h] + unit.cpu) / host.cpu_cores + (self.mem[h] + unit.memory) / host.memory

    def stable_vm(self, name: str) -> bool:
        """Whether the VM's CPU and memory demand were stable over the window."""
        key = "vm:" + name
        if key not in self._stable:
            d, pol = self.vms[name].demand, self.policy
            cv = pol.stable_cv
            self._stable[key] = load.stable(d.cpu, cv, pol.stable_cpu_floor) and load.stable(
                d.memory, cv, pol.stable_memory_floor
            )
        return self._stable[key]

    def stable_host(self, name: str) -> bool:
        """Whether the host's own measured load was stable over the window."""
        key = "host:" + name
        if key not in self._stable:
            h, pol = self.hosts[name].load, self.policy
            cv = pol.stable_cv
            self._stable[key] = load.stable(h.cpu, cv, pol.stable_cpu_floor) and load.stable(
                h.memory, cv, pol.stable_memory_floor
            )
        return self._stable[key]

    def ascending(self) -> Iterator[str]:
        """Balanced hosts, least loaded first (ties by name)."""
        return (n for _, n in self.by_load)

    def descending(self) -> Iterator[str]:
        return (n for _, n in reversed(self.by_load))

    # --- units ------------------------------------------------------------------------------------------

    def unit(self, vm: str) -> Unit:
        """``vm`` and the VMs a must-affinity rule binds it to."""
        names = self.group_of.get(vm, (vm,))
        return Unit(
            vms=names,
            cpu=sum(map(self.cpu_of, names)),
            memory=sum(map(self.mem_of, names)),
            allocated=sum(self.vms[n].memory for n in names),
            cpus=max(self.vms[n].cpus for n in names),
        )

    def units_on(self, h: str) -> list[Unit]:
        """The units whose VMs all run on ``h``, by name (kept until a move touches ``h``)."""
        cached = self._units.get(h)
        if cached is None:
            cached = self._units[h] = self._units_on(h)
        return cached

    def movable_on(self, h: str) -> list[Unit]:
        """:meth:`units_on` without units a move of this plan took already or whose demand was not
        stable over the window: the ones balancing may move."""
        cached = self._movable.get(h)
        if cached is None:
            cached = self._movable[h] = [
                u
                for u in self.units_on(h)
                if not any(n in self.touched or not self.stable_vm(n) for n in u.vms)
            ]
        return cached

    def _units_on(self, h: str) -> list[Unit]:
        seen: set[str] = set()
        out = []
        for n in sorted(self.on[h]):
            if n in seen:
                continue
            u = self.unit(n)
            seen.update(u.vms)
            if all(self.host_of[m] == h for m in u.vms):
                out.append(u)
        return out

    # --- what fits --------------------------------------------------------------------------------------

    def refusal(self, unit: Unit, h: str, *, should: bool = True) -> str | None:
        """Why ``unit`` cannot go to host ``h`` (``None``: it can), disks aside; ``should``: should-rules
        count too. VMs of the unit already on ``h`` need no room there."""
        host = self.hosts[h]
        if host.state is not HostState.UP:
            return f"is {host.state.value}"
        p = self.policy
        cpu, allocated = unit.cpu, unit.allocated
        if len(unit.vms) > 1 or self.host_of.get(unit.vms[0]) == h:
            away = [n for n in unit.vms if self.host_of.get(n) != h]
            cpu = sum(map(self.cpu_of, away))
            allocated = sum(self.vms[n].memory for n in away)
        if allocated and self.alloc[h] + allocated > host.memory * p.memory_limit:
            free = host.memory * p.memory_limit - self.alloc[h]
            return f"lacks memory ({_gib(allocated)} needed, {_gib(max(0.0, free))} free)"
        if cpu and self.cpu[h] + cpu > host.cpu_cores * p.cpu_limit:
            return f"lacks CPU ({cpu:.1f} cores needed, {self.cpu[h]:.1f} of {host.cpu_cores} busy)"
        if unit.cpus > host.cpu_cores:
            return f"has {host.cpu_cores} cores ({unit.cpus} vCPUs needed)"
        for n in unit.vms:
            if not host.offers(self.cpu_model(n)):
                return f"has another CPU model ({host.cpu_model})"
        for n in unit.vms:
            for r in self.rules_of.get(n, ()):
                if (should or r.strength is Strength.MUST) and not allows(r, n, h, self.host_of, unit.vms):
                    return f"is excluded by {r.describe()}"
        return None

    def cpu_model(self, vm: str) -> str | None:
        """The CPU model the VM needs: its named one, or that of the host it runs on."""
        v = self.vms[vm]
        if v.cpu_model is not None:
            return v.cpu_model
        here = self.hosts.get(self.host_of.get(vm, ""))
        return here.cpu_model if here is not None else None

    def storage_for(self, unit: Unit, h: str) -> dict[str, str] | None:
        """Where the unit's disks go if it moves to ``h``: VM -> datastore for each VM with a disk on a
        datastore ``h`` does not see (all of such a VM's disks go to one datastore ``h`` sees, the one
        with most room, kept under the space threshold); ``{}``: ``h`` sees them all; ``None``: no room."""
        host = self.hosts[h]
        out: dict[str, str] = {}
        taken: dict[str, int] = {}
        for n in unit.vms:
            disks = self.vms[n].disks
            away = [d for d in disks if d.datastore not in host.datastores]
            if not away:
                continue
            need = sum(d.allocated for d in away)
            best = self.room_for(need, sorted(host.datastores), taken)
            if best is None:
                return None
            out[n] = best
            taken[best] = taken.get(best, 0) + need
        return out

    def room_for(self, need: int, stores: list[str], taken: dict[str, int] | None = None) -> str | None:
        """The datastore of ``stores`` with most free space that takes ``need`` bytes and stays under the
        space threshold."""
        best: tuple[int, str] | None = None
        for s in stores:
            ds = self.datastores.get(s)
            if ds is None:
                continue
            free = self.ds_free[s] - (taken or {}).get(s, 0) - need
            if free < 0 or ds.capacity - free > ds.capacity * self.policy.space_threshold:
                continue
            if best is None or (-free, s) < best:
                best = (-free, s)
        return None if best is None else best[1]

    # --- applying ---------------------------------------------------------------------------------------

    def apply(self, unit: Unit, dst: str, stores: dict[str, str]) -> None:
        """Move the unit's VMs (from wherever each is) to ``dst``; VMs in ``stores`` take their disks
        on datastores ``dst`` does not see to that datastore."""
        self.epoch += 1
        for n in unit.vms:
            src = self.host_of[n]
            if src == dst:
                continue
            self.host_of[n] = dst
            self.touched.add(n)
            for cache in (self._units, self._movable):
                cache.pop(src, None)
                cache.pop(dst, None)
            self.on[src].discard(n)
            self.on[dst].add(n)
            memory = self.vms[n].memory
            self.alloc[src] -= memory
            self.alloc[dst] += memory
            self._shift(src, -self.cpu_of(n), -self.mem_of(n))
            self._shift(dst, self.cpu_of(n), self.mem_of(n))
        seen = self.hosts[dst].datastores
        for n, target in stores.items():
            self.move_disks(n, target, self.vms[n].datastores - seen)

    def move_disks(self, vm: str, target: str, sources: frozenset[str]) -> None:
        """Move the VM's disks on ``sources`` to ``target``: their space leaves the one, takes the other."""
        v = self.vms[vm]
        self.touched.add(vm)
        self._movable.pop(self.host_of[vm], None)
        for d in v.disks:
            if d.datastore in sources and d.datastore != target:
                self.ds_free[d.datastore] = self.ds_free.get(d.datastore, 0) + d.allocated
                self.ds_free[target] -= d.allocated
        self.vms[vm] = _with_disks_on(v, target, sources)

    def _shift(self, h: str, dcpu: float, dmem: float) -> None:
        old = self.load[h]
        # Measured host load and the VMs' own demand come from different samples: never below zero.
        self.cpu[h] = max(0.0, self.cpu[h] + dcpu)
        self.mem[h] = max(0.0, self.mem[h] + dmem)
        new = self._load(h, 0.0, 0.0)
        self.load[h] = new
        self.version[h] += 1
        if h in self._balanced:
            self.sum += new - old
            self.sum_sq += new * new - old * old
            i = bisect.bisect_left(self.by_load, (old, h))
            del self.by_load[i]
            bisect.insort(self.by_load, (new, h))


def _affinity_groups(rules: tuple[Rule, ...]) -> dict[str, tuple[str, ...]]:
    """VM -> its must-affinity group (VMs joined by must-affinity rules, transitively), sorted."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in rules:
        if r.kind is RuleKind.AFFINITY and r.strength is Strength.MUST:
            first, *rest = sorted(r.vms)
            for n in rest:
                parent[root(n)] = root(first)
    groups: dict[str, list[str]] = {}
    for n in parent:
        groups.setdefault(root(n), []).append(n)
    return {n: tuple(sorted(g)) for g in groups.values() if len(g) > 1 for n in g}


def _with_disks_on(v: Vm, target: str, sources: frozenset[str]) -> Vm:
    return replace(
        v, disks=tuple(replace(d, datastore=target) if d.datastore in sources else d for d in v.disks)
    )


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"
