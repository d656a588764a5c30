"""The stand-in placement: least-loaded fitting host. Pure."""

from __future__ import annotations

from hikkoshi.cluster.host_view import HostState, HostView
from hikkoshi.cluster.models import HostInfo, HostLoad, HostStatus, Maintenance, VmRecord
from hikkoshi.cluster.placement import least_loaded

GIB = 1 << 30


def host(name: str, cpu: float, free: int, ds_free: int, state: HostState = HostState.UP) -> HostView:
    info = HostInfo(name=name, api_address=f"http://{name}", memory_total=64 * GIB)
    status = (
        None
        if state is HostState.DOWN
        else HostStatus(memory_free=free, datastores_free={f"{name}-ds": ds_free}, load=HostLoad(cpu=cpu))
    )
    maint = Maintenance(reason="x") if state is HostState.MAINTENANCE else None
    return HostView(info, status, maint, state)


def test_least_loaded_fitting_host() -> None:
    vm = VmRecord(uuid="u", name="v", memory=4 * GIB, disk_bytes=10 * GIB)
    hosts = [
        host("idle-but-down", 0.0, 32 * GIB, 100 * GIB, HostState.DOWN),
        host("idle-in-maintenance", 0.0, 32 * GIB, 100 * GIB, HostState.MAINTENANCE),
        host("no-memory", 0.1, 2 * GIB, 100 * GIB),
        host("no-space", 0.1, 32 * GIB, 5 * GIB),
        host("busy", 0.9, 32 * GIB, 100 * GIB),
        host("quiet", 0.3, 8 * GIB, 100 * GIB),
        host("quiet-roomier", 0.3, 16 * GIB, 100 * GIB),
    ]
    chosen = least_loaded(hosts, vm)
    assert chosen is not None and chosen.info.name == "quiet-roomier"
    assert least_loaded(hosts[:4], vm) is None
    pinned = vm.model_copy(update={"datastore": "busy-ds"})
    assert least_loaded(hosts, pinned).info.name == "busy"  # type: ignore[union-attr]
