"""Made-up clusters for the simulator, the benchmark and the tests: deterministic for a seed.

Hosts of 96 cores and 1 TiB for VMs, grouped in sites; each site has shared datastores every host of it
sees. VMs of 1-8 vCPUs and 2-16 GiB, each busy at a steady level with a little noise per sample, one
thin disk on a datastore of its site, a dirty rate of a few to 200 MiB/s. ``hot`` of the VMs go to the
first ``hot_hosts`` share of hosts (0: spread evenly); every host keeps its memory and CPU within capacity.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hikkoshi.drs.model import Datastore, Demand, Host, HostLoad, Limits, Link, Snapshot, Vm, VmDisk

GIB = 1 << 30
MIB = 1 << 20
TIB = 1 << 40


@dataclass(frozen=True)
class Shape:
    """What to make."""

    hosts: int = 16
    vms: int = 320
    sites: int = 1
    datastores_per_site: int = 2
    hot: float = 0.0
    """Share of the VMs placed on the hot hosts (0: none favoured)."""
    hot_hosts: float = 0.25
    samples: int = 12
    noise: float = 0.05
    """Each sample is the VM's level times (1 + noise x a standard normal)."""
    cores: int = 96
    memory: int = 1 << 40
    seed: int = 0
    limits: Limits = field(default_factory=Limits)


_CPUS = (1, 2, 4, 8)
_MEMORY = (2 * GIB, 4 * GIB, 8 * GIB, 16 * GIB)
_OVERHEAD_CPU = 1.0
_OVERHEAD_MEM = 8 * GIB


def cluster(shape: Shape) -> Snapshot:
    """A cluster of ``shape``."""
    rng = random.Random(shape.seed)
    sites = [f"site{i}" for i in range(shape.sites)]
    host_site = [sites[i % shape.sites] for i in range(shape.hosts)]
    names = [f"h{i:04d}" for i in range(shape.hosts)]
    stores = {s: [f"{s}-ds{j}" for j in range(shape.datastores_per_site)] for s in sites}
    hot = max(1, int(shape.hosts * shape.hot_hosts))
    cpu_used = [0.0] * shape.hosts
    mem_alloc = [0] * shape.hosts
    placed: list[list[Vm]] = [[] for _ in range(shape.hosts)]
    for i in range(shape.vms):
        cpus, memory = rng.choice(_CPUS), rng.choice(_MEMORY)
        level = cpus * rng.uniform(0.1, 0.5)
        active = memory * rng.uniform(0.3, 0.8)
        first = rng.randrange(hot) if rng.random() < shape.hot else rng.randrange(shape.hosts)
        h = _fitting(first, level, memory, cpu_used, mem_alloc, shape)
        cpu_used[h] += level
        mem_alloc[h] += memory
        site = host_site[h]
        size = rng.choice((20, 50, 100)) * GIB
        disk = VmDisk("disk0", rng.choice(stores[site]), size, int(size * rng.uniform(0.2, 0.6)))
        demand = Demand(
            cpu=_samples(rng, level, shape),
            memory=_samples(rng, active, shape),
            disk_read=_samples(rng, rng.uniform(0, 20) * MIB, shape),
            disk_write=_samples(rng, rng.uniform(0, 10) * MIB, shape),
            network=_samples(rng, rng.uniform(0, 50) * MIB, shape),
        )
        placed[h].append(
            Vm(
                name=f"vm{i:05d}",
                uuid=f"00000000-0000-4000-8000-{i:012d}",
                host=names[h],
                memory=memory,
                cpus=cpus,
                disks=(disk,),
                demand=demand,
                dirty_rate=rng.uniform(2, 200) * MIB,
                cpu_model="EPYC-Rome",
            )
        )
    hosts = []
    for i, n in enumerate(names):
        cpu = [_OVERHEAD_CPU] * shape.samples
        mem = [float(_OVERHEAD_MEM)] * shape.samples
        for v in placed[i]:
            for k in range(shape.samples):
                cpu[k] += v.demand.cpu[k]
                mem[k] += v.demand.memory[k]
        hosts.append(
            Host(
                name=n,
                site=host_site[i],
                cpu_cores=shape.cores,
                cpu_model="EPYC-Rome",
                memory=shape.memory,
                datastores=frozenset(stores[host_site[i]]),
                load=HostLoad(tuple(cpu), tuple(mem)),
            )
        )
    datastores = []
    for s in sites:
        seeing = frozenset(n for n, hs in zip(names, host_site, strict=True) if hs == s)
        for d in stores[s]:
            used = sum(disk.allocated for vs in placed for v in vs for disk in v.disks if disk.datastore == d)
            capacity = max(100 * TIB, used * 2)
            datastores.append(Datastore(d, capacity, capacity - used, seeing, (5.0,) * shape.samples))
    links = [Link(a, b, 125e6, 40.0) for i, a in enumerate(sites) for b in sites[i + 1 :]]
    return Snapshot(
        hosts=tuple(hosts),
        vms=tuple(v for vs in placed for v in vs),
        datastores=tuple(datastores),
        links=tuple(links),
        limits=shape.limits,
    )


def _fitting(
    first: int, cpu: float, memory: int, cpu_used: list[float], alloc: list[int], shape: Shape
) -> int:
    """``first`` if the VM fits there, else the next host that it fits."""
    for k in range(shape.hosts):
        h = (first + k) % shape.hosts
        if cpu_used[h] + cpu + _OVERHEAD_CPU <= shape.cores and alloc[h] + memory <= shape.memory:
            return h
    raise ValueError("the VMs do not fit the hosts")


def _samples(rng: random.Random, level: float, shape: Shape) -> tuple[float, ...]:
    return tuple(max(0.0, level * (1 + shape.noise * rng.gauss(0, 1))) for _ in range(shape.samples))
