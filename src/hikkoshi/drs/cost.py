"""What a move would cost: its migration predicted by :mod:`hikkoshi.migrate.predict`, in cost units.

Predictions are cached per VM, pair of sites and storage mode (a VM's migration within a site costs
the same whichever host of the site it goes to), so a plan predicts each VM a few times at most.
"""

from __future__ import annotations

from hikkoshi.drs import load
from hikkoshi.drs.model import Host, Snapshot, Vm
from hikkoshi.drs.policy import Policy
from hikkoshi.migrate.convergence import build_schedule
from hikkoshi.migrate.predict import (
    Disk,
    Link,
    Migration,
    Mode,
    Prediction,
    predict,
    predict_cold,
    predict_disk_move,
)


class Costs:
    """Predictions for one planning call."""

    def __init__(self, snap: Snapshot, policy: Policy) -> None:
        self.policy = policy
        self.limits = snap.limits
        self.links = {frozenset((k.a, k.b)): Link(k.bandwidth, k.rtt_ms) for k in snap.links}
        self.schedule = build_schedule(snap.limits.max_downtime_ms, allow_postcopy=snap.limits.allow_postcopy)
        self._cache: dict[tuple[str, str, str, Mode, frozenset[str]], Prediction] = {}

    def link(self, a: str, b: str) -> Link:
        """Between sites ``a`` and ``b`` (the policy's LAN within a site that has no link of its own)."""
        found = self.links.get(frozenset((a, b)))
        if found is None and a == b:
            return self.policy.lan
        if found is None:
            raise KeyError(f"no link between sites {a} and {b}")
        return found

    def inputs(self, vm: Vm, src: Host, dst: Host, moving: frozenset[str]) -> Migration:
        """What is known before ``vm`` goes from ``src`` to ``dst`` (its disks on ``moving`` along)."""
        disks = tuple(Disk(d.size, d.allocated) for d in vm.disks if d.datastore in moving)
        return Migration(
            memory_bytes=vm.memory,
            dirty_rate=vm.dirty_rate,
            link=self.link(src.site, dst.site),
            mode=self.policy.storage_mode if moving else Mode.SHARED,
            disks=disks,
            disk_write_rate=load.mean(vm.demand.disk_write) if disks else 0.0,
            schedule=self.schedule,
            resident_bytes=None if vm.resident is None else min(vm.resident, vm.memory),
        )

    def migration(self, vm: Vm, src: Host, dst: Host, moving: frozenset[str]) -> Prediction:
        """``vm`` from ``src`` to ``dst``, its disks on the datastores ``moving`` going along."""
        mode = self.policy.storage_mode if moving else Mode.SHARED
        key = (vm.name, src.site, dst.site, mode, moving)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = predict(self.inputs(vm, src, dst, moving), self.policy.calibration)
        return found

    def cold(self, vm: Vm, src: Host, dst: Host) -> Prediction:
        """Powered-off ``vm`` from ``src`` to ``dst``: every disk copied over the link."""
        return predict_cold(sum(d.allocated for d in vm.disks), self.link(src.site, dst.site))

    def disk_move(self, vm: Vm, sources: frozenset[str], rate: float) -> Prediction:
        """``vm``'s disks on ``sources`` copied to another datastore of its host at ``rate``."""
        allocated = sum(d.allocated for d in vm.disks if d.datastore in sources)
        return predict_disk_move(allocated, load.mean(vm.demand.disk_write), rate)

    def units(self, p: Prediction) -> float:
        """The prediction's price: time, bytes and downtime, each over the policy's unit."""
        pol = self.policy
        return (
            p.total_time_ms / 1000 / pol.cost_unit_s
            + p.bytes / pol.cost_unit_bytes
            + p.downtime_ms / pol.cost_unit_downtime_ms
        )

    def acceptable(self, p: Prediction) -> str | None:
        """Why the migration cannot be recommended (``None``: it can)."""
        if not p.converges:
            return f"its migration would not converge ({p.explanation})"
        if p.total_time_ms > self.limits.max_migration_s * 1000:
            limit = self.limits.max_migration_s
            return f"its migration would take {p.total_time_ms / 1000:.0f} s (limit {limit:.0f} s)"
        return None
