"""Benchmark the cluster store: etcd holding 1,000 hosts and 30,000 VMs.

    .venv/bin/python -m bench.run_cluster [--hosts 1000] [--vms 30000] [--list 10000] [--repeat 7]

Starts one etcd member (Debian's etcd-server) on free loopback ports in a temporary directory, fills it
with generated hosts (record + leased status) and VMs (record + unique name + owner key), then times:

- ``list VMs``: :meth:`Ownership.list_vms` of ``--list`` VMs with their owners (two range reads at one
  revision, paged, and pydantic validation of every record);
- ``raw range``: the same VM keys as bytes only (the peer: what etcd and gRPC cost without us);
- ``place one VM``: :func:`list_hosts` (three range reads) and the least-loaded fitting host;
- ``create VM``, ``check owner``: one transaction, one linearizable read.

Median and best of ``--repeat`` runs each. Results (machine facts, versions, raw timings) go to
bench/results/cluster-<UTC timestamp>.json and a markdown table is printed. Exit status 0 whatever the
numbers say; 2 when etcd is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from hikkoshi.cluster import txn as t
from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import EtcdNotInstalled
from hikkoshi.cluster.etcd_process import EtcdMember, MemberSpec, free_ports
from hikkoshi.cluster.hosts import list_hosts
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.lease import kept_lease
from hikkoshi.cluster.models import DatastoreInfo, HostInfo, HostLoad, HostStatus, Owner, VmRecord
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.cluster.placement import least_loaded
from hikkoshi.cluster.store import Store

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
BATCH = 120
"""Writes per transaction while loading (etcd allows 128 by default)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hosts_and_vms(
    n_hosts: int, n_vms: int, seed: int = 17
) -> tuple[list[tuple[HostInfo, HostStatus]], list[VmRecord]]:
    """Deterministic generated hosts (two datastores each, random load) and VMs."""
    rng = random.Random(seed)
    hosts = []
    for i in range(n_hosts):
        name = f"host{i:04d}"
        ds = tuple(DatastoreInfo(name=f"ds{j}", uuid=f"{name}-ds{j}", capacity=4096 * GIB) for j in range(2))
        memory = rng.choice((128, 256, 512)) * GIB
        info = HostInfo(
            name=name,
            api_address=f"https://10.{i // 250}.{i % 250}.1:8710",
            migration_addresses=(f"10.{i // 250}.{i % 250}.2",),
            site=f"site{i % 4}",
            cpu_model="EPYC-Milan",
            memory_total=memory,
            datastores=ds,
        )
        status = HostStatus(
            agent=uuid.UUID(int=rng.getrandbits(128)).hex,
            memory_free=rng.randrange(0, memory),
            datastores_free={d.uuid: rng.randrange(0, d.capacity) for d in ds},
            load=HostLoad(cpu=rng.random(), vms=n_vms // max(1, n_hosts)),
        )
        hosts.append((info, status))
    vms = [
        VmRecord(
            uuid=str(uuid.UUID(int=rng.getrandbits(128))),
            name=f"vm{i:05d}",
            memory=rng.choice((1, 2, 4, 8, 16)) * GIB,
            vcpus=rng.choice((1, 2, 4)),
            disk_bytes=rng.choice((10, 20, 40, 100)) * GIB,
        )
        for i in range(n_vms)
    ]
    return hosts, vms


async def load(
    store: Store, keys: Keys, hosts: list[tuple[HostInfo, HostStatus]], vms: list[VmRecord], lease: int
) -> float:
    began = time.perf_counter()
    puts: list[t.Action] = []
    for info, status in hosts:
        puts += [
            t.Put(keys.host(info.name), info.to_bytes()),
            t.Put(keys.live(info.name), status.to_bytes(), lease),
        ]
    rng = random.Random(5)
    for vm in vms:
        owner = Owner(host=rng.choice(hosts)[0].name, claim=uuid.uuid4().hex)
        puts += [
            t.Put(keys.vm(vm.uuid), vm.to_bytes()),
            t.Put(keys.name(vm.name), vm.uuid.encode()),
            t.Put(keys.owner(vm.uuid), owner.to_bytes()),
        ]
    for i in range(0, len(puts), BATCH):
        await store.txn([], puts[i : i + BATCH])
    return time.perf_counter() - began


async def timed(repeat: int, fn: Callable[[], Awaitable[Any]]) -> tuple[list[float], Any]:
    out = []
    result = None
    for _ in range(repeat):
        began = time.perf_counter()
        result = await fn()
        out.append(time.perf_counter() - began)
    return out, result


def machine() -> dict[str, Any]:
    def first(path: str, field: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    return {
        "nproc": os.cpu_count(),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "mem_total": first("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def version(argv: Sequence[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        return None


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    client, peer = free_ports(2)
    member = EtcdMember(MemberSpec("bench", workdir / "etcd", client, peer))
    results: dict[str, Any] = {"settings": dict(vars(args)), "etcd_command": member.command()}
    async with member:
        config = EtcdConfig((member.spec.endpoint,), deadline=60.0, attempt_timeout=30.0)
        async with Store(config) as store, kept_lease(store, 60) as lease:
            keys = Keys("/hikkoshi")
            hosts, vms = hosts_and_vms(args.hosts, args.vms)
            log(f"loading {len(hosts)} hosts and {len(vms)} VMs ...")
            results["load_seconds"] = await load(store, keys, hosts, vms, lease.id)
            results["keys"] = await store.count_prefix("/hikkoshi/")
            own = Ownership(store, keys)
            timings: dict[str, list[float]] = {}

            timings["list_vms"], views = await timed(args.repeat, lambda: own.list_vms(limit=args.list))
            assert len(views) == args.list and all(v.owner for v in views)
            timings["raw_range"], snap = await timed(
                args.repeat, lambda: store.get_prefix(keys.vms, limit=args.list)
            )
            assert len(snap.kvs) == args.list
            new = VmRecord(uuid=str(uuid.uuid4()), name="placed", memory=8 * GIB, disk_bytes=40 * GIB)

            async def place() -> str | None:
                chosen = least_loaded(await list_hosts(store, keys), new)
                return chosen.info.name if chosen else None

            timings["place_vm"], chosen = await timed(args.repeat, place)
            assert chosen is not None
            results["placed_on"] = chosen
            timings["list_hosts"], listed = await timed(args.repeat, lambda: list_hosts(store, keys))
            assert len(listed) == args.hosts
            counter = iter(range(10**6))

            async def create() -> Any:
                i = next(counter)
                vm = VmRecord(uuid=str(uuid.uuid4()), name=f"new{i}", memory=GIB)
                return await own.create_vm(vm, chosen)

            timings["create_vm"], claim = await timed(args.repeat, create)
            timings["check_owner"], _ = await timed(
                args.repeat, lambda: own.check_owner(claim.uuid, claim.host, claim.token)
            )
            status = await member.status()
            results["etcd_db_size"] = int(str(status.get("dbSize") or 0))
            results["etcd_version"] = status.get("version")
        results["timings"] = timings
    return results


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    rows = [
        ("list_vms", f"list {s['list']:,} VMs with owners (typed)"),
        ("raw_range", f"range {s['list']:,} VM keys, bytes only (peer)"),
        ("place_vm", f"place one VM (list {s['hosts']:,} hosts + choose)"),
        ("list_hosts", f"list {s['hosts']:,} hosts"),
        ("create_vm", "create one VM (record + name + owner, one txn)"),
        ("check_owner", "check_owner (one linearizable read)"),
    ]
    out = ["| operation | median ms | best ms |", "|---|---:|---:|"]
    for key, label in rows:
        ts = results["timings"][key]
        out.append(f"| {label} | {statistics.median(ts) * 1000:.1f} | {min(ts) * 1000:.1f} |")
    ratio = statistics.median(results["timings"]["list_vms"]) / statistics.median(
        results["timings"]["raw_range"]
    )
    out.append("")
    out.append(
        f"{s['hosts']:,} hosts and {s['vms']:,} VMs ({results['keys']:,} keys, etcd db "
        f"{(results['etcd_db_size'] or 0) / 2**20:.0f} MiB) loaded in {results['load_seconds']:.1f} s; "
        f"typed listing / raw range = {ratio:.2f}."
    )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_cluster", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--vms", type=int, default=30000)
    p.add_argument("--list", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--output-dir", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    if args.list > args.vms:
        p.error("--list cannot exceed --vms")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        with tempfile.TemporaryDirectory(prefix="hikkoshi-bench-cluster-") as tmp:
            results = asyncio.run(bench(args, Path(tmp)))
    except EtcdNotInstalled as e:
        log(str(e))
        return 2
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    results["machine"] = machine()
    results["versions"] = {"hikkoshi": rev.stdout.strip(), "etcd": version(["etcd", "--version"])}
    results["settings"]["output_dir"] = str(args.output_dir)
    results["markdown"] = markdown(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"cluster-{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(results["markdown"])
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
