"""The cluster's snapshot for DRS, read from etcd in a few requests (see :mod:`hikkoshi.agent.drs_snapshot`
for what it means)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hikkoshi.agent.drs_prediction import Forecast, forecast
from hikkoshi.agent.drs_snapshot import ClusterVm, snapshot
from hikkoshi.cluster.drs_records import DrsRecords
from hikkoshi.cluster.host_view import HostView
from hikkoshi.cluster.hosts import list_hosts
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.links import Links
from hikkoshi.cluster.models import DrsSettings
from hikkoshi.cluster.observations import Observations
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.cluster.store import Store
from hikkoshi.drs.model import Limits, Snapshot
from hikkoshi.drs.policy import Policy
from hikkoshi.migrate.observation import calibration_for, observed_of
from hikkoshi.migrate.predict import Mode, Observed


@dataclass(frozen=True)
class ClusterState:
    """What DRS needs of the cluster, read now."""

    hosts: list[HostView]
    vms: list[ClusterVm]
    settings: DrsSettings
    snapshot: Snapshot
    observations: list[Observed] = field(default_factory=list)
    """The cluster's recent completed migrations, oldest first: what predictions calibrate on."""

    def host(self, name: str) -> HostView | None:
        return next((h for h in self.hosts if h.info.name == name), None)

    def forecast(self, vm: str, target: str, storage: str, max_downtime_ms: int = 300) -> Forecast | str:
        """The prediction of moving ``vm`` to ``target`` from these figures, calibrated on these
        observations (:func:`hikkoshi.agent.drs_prediction.forecast`), or why there is none."""
        return forecast(
            self.snapshot,
            vm,
            target,
            storage,
            max_downtime_ms=max_downtime_ms,
            observations=self.observations,
        )

    def policy(self, level: int | None = None) -> Policy:
        """The planner's policy at ``level`` (default: the cluster's), its migration costs calibrated on
        the cluster's own completed migrations (the planner's storage mode's when there are enough)."""
        calibration, _runs = calibration_for(self.observations, Mode.HYBRID)
        return Policy(level=level or self.settings.level, calibration=calibration)

    def datastore_name(self, host: str, uuid: str) -> str | None:
        """The name ``host`` gives the datastore ``uuid``."""
        view = self.host(host)
        if view is None:
            return None
        return next((d.name for d in view.info.datastores if d.uuid == uuid), None)


async def read_state(store: Store, keys: Keys | None = None, *, max_moves: int | None = None) -> ClusterState:
    """Hosts, VMs, rules and settings, as a snapshot (``max_moves``: the plan's cap, else the settings')."""
    k = keys or Keys()
    hosts = await list_hosts(store, k)
    records = DrsRecords(store, k)
    vms = [
        ClusterVm(v.vm.name, v.vm.uuid, v.owner, v.vm.memory, v.vm.vcpus, v.vm.disk_bytes, v.vm.datastore)
        for v in await Ownership(store, k).list_vms()
    ]
    settings = await records.settings()
    rules = await records.rules()
    limits = Limits(max_moves=max_moves or settings.max_moves)
    measured = await Links(store, k).all()
    seen = [observed_of(o.inputs, o.report) for o in await Observations(store, k).recent()]
    return ClusterState(
        hosts,
        vms,
        settings,
        snapshot(hosts, vms, rules, limits=limits, measured=measured),
        [o for o in seen if o is not None],
    )
