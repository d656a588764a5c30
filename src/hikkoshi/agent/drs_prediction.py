"""What one migration in the cluster will cost, before it runs: :func:`hikkoshi.migrate.predict.predict`
fed from the DRS snapshot (the VM's memory and resident set, its disks and their write rate, the link
between the hosts' sites) the way the planner prices its moves. Pure."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hikkoshi.drs.cost import Costs
from hikkoshi.drs.model import Snapshot
from hikkoshi.drs.policy import Policy
from hikkoshi.migrate.predict import Mode, Prediction


@dataclass(frozen=True)
class Forecast:
    """A migration's prediction and what it assumed."""

    vm: str
    source: str
    target: str
    storage: str
    predicted: Prediction
    assumptions: dict[str, object]

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "from": self.source,
            "to": self.target,
            "storage": self.storage,
            "predicted": self.predicted.to_json(),
            "assumptions": self.assumptions,
        }


def forecast(
    snap: Snapshot, vm_name: str, target: str, storage: str = "hybrid", *, max_downtime_ms: int = 300
) -> Forecast | str:
    """The prediction of moving ``vm_name`` to host ``target`` (disks by ``storage`` unless the target
    sees their datastore, or ``storage`` is ``shared``), or why there is none."""
    vm = next((v for v in snap.vms if v.name == vm_name), None)
    if vm is None:
        return f"VM {vm_name!r} is not running in the cluster (no figures to predict from)"
    hosts = {h.name: h for h in snap.hosts}
    if target not in hosts:
        return f"no host named {target!r} in the cluster"
    src, dst = hosts[vm.host], hosts[target]
    moving = frozenset() if storage == Mode.SHARED else vm.datastores - dst.datastores
    mode = Mode(storage) if moving else Mode.HYBRID
    limited = replace(snap, limits=replace(snap.limits, max_downtime_ms=max_downtime_ms))
    costs = Costs(limited, Policy(storage_mode=mode))
    predicted = costs.migration(vm, src, dst, moving)
    link = costs.link(src.site, dst.site)
    assumptions: dict[str, object] = {
        "memory_bytes": vm.memory,
        "resident_bytes": vm.resident,
        "dirty_rate": vm.dirty_rate,
        "disk_bytes_moving": sum(d.allocated for d in vm.disks if d.datastore in moving),
        "link_bandwidth": link.bandwidth,
        "link_rtt_ms": link.rtt_ms,
        "max_downtime_ms": max_downtime_ms,
    }
    return Forecast(vm.name, src.name, dst.name, mode.value if moving else "shared", predicted, assumptions)


def alone(memory: int, disks: tuple[tuple[int, int], ...], storage: str, max_downtime_ms: int) -> Prediction:
    """The prediction of a migration between agents outside a cluster (no figures in etcd): the VM's
    configured memory, its disks' (size, allocated) moving unless ``shared``, over the policy's LAN."""
    from hikkoshi.migrate.convergence import build_schedule
    from hikkoshi.migrate.predict import Disk, Migration, predict

    mode = Mode(storage)
    return predict(
        Migration(
            memory_bytes=memory,
            dirty_rate=0.0,
            link=Policy().lan,
            mode=mode,
            disks=() if mode is Mode.SHARED else tuple(Disk(s, a) for s, a in disks),
            schedule=build_schedule(max_downtime_ms),
        )
    )
