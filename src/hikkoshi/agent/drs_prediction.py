"""What one migration in the cluster will cost, before it runs: :func:`hikkoshi.migrate.predict.predict`
fed from the DRS snapshot (the VM's memory, resident set and measured dirty rate, its disks and their
write rate, the link between the hosts' sites as the last migration measured it) the way the planner
prices its moves, with the fixed costs calibrated on the cluster's recent migrations
(:mod:`hikkoshi.migrate.observation`). Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from hikkoshi.drs.cost import Costs
from hikkoshi.drs.model import Snapshot
from hikkoshi.drs.policy import Policy
from hikkoshi.migrate.observation import calibration_for, migration_json
from hikkoshi.migrate.predict import Mode, Observed, Prediction


@dataclass(frozen=True)
class Forecast:
    """A migration's prediction and what it assumed."""

    vm: str
    source: str
    target: str
    storage: str
    predicted: Prediction
    assumptions: dict[str, object]
    inputs: dict[str, object] = field(default_factory=dict)
    """The prediction's inputs (:func:`~hikkoshi.migrate.observation.migration_json`): kept with the
    migration, they make it an observation the next calibration learns from."""

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
    snap: Snapshot,
    vm_name: str,
    target: str,
    storage: str = "hybrid",
    *,
    max_downtime_ms: int = 300,
    observations: Sequence[Observed] = (),
) -> Forecast | str:
    """The prediction of moving ``vm_name`` to host ``target`` (disks by ``storage`` unless the target
    sees their datastore, or ``storage`` is ``shared``), calibrated on ``observations`` (the cluster's
    recent migrations, oldest first), or why there is none."""
    vm = next((v for v in snap.vms if v.name == vm_name), None)
    if vm is None:
        return f"VM {vm_name!r} is not running in the cluster (no figures to predict from)"
    hosts = {h.name: h for h in snap.hosts}
    if target not in hosts:
        return f"no host named {target!r} in the cluster"
    src, dst = hosts[vm.host], hosts[target]
    moving = frozenset() if storage == Mode.SHARED else vm.datastores - dst.datastores
    mode = Mode(storage) if moving else Mode.HYBRID
    calibration, runs = calibration_for(observations, Mode(storage) if moving else Mode.SHARED)
    limited = replace(snap, limits=replace(snap.limits, max_downtime_ms=max_downtime_ms))
    costs = Costs(limited, Policy(storage_mode=mode, calibration=calibration))
    predicted = costs.migration(vm, src, dst, moving)
    inputs = migration_json(costs.inputs(vm, src, dst, moving), max_downtime_ms, snap.limits.allow_postcopy)
    link = costs.link(src.site, dst.site)
    pair = frozenset((src.site, dst.site))
    measured = any(k.measured for k in snap.links if frozenset((k.a, k.b)) == pair)
    assumptions: dict[str, object] = {
        "memory_bytes": vm.memory,
        "resident_bytes": vm.resident,
        "dirty_rate": vm.dirty_rate,
        "disk_bytes_moving": sum(d.allocated for d in vm.disks if d.datastore in moving),
        "link_bandwidth": link.bandwidth,
        "link_rtt_ms": link.rtt_ms,
        "link": "measured" if measured else "assumed",
        "max_downtime_ms": max_downtime_ms,
        "calibrated_on": runs,
    }
    storage_used = mode.value if moving else "shared"
    return Forecast(vm.name, src.name, dst.name, storage_used, predicted, assumptions, dict(inputs))


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
