"""A stand-in placement: the least-loaded up host that fits the VM. Pure.

The real placement (DRS: rules, loads over time, predicted migration costs) comes with the planner;
until then this is what ``hikkoshi vm create`` in a cluster and the benchmark use.
"""

from __future__ import annotations

from collections.abc import Iterable

from hikkoshi.cluster.host_view import HostState, HostView
from hikkoshi.cluster.models import VmRecord


def fits(host: HostView, vm: VmRecord) -> bool:
    """Up (not down, not in maintenance), enough free memory, and one datastore with room for the disks."""
    st = host.status
    if host.state is not HostState.UP or st is None or st.memory_free < vm.memory:
        return False
    if vm.datastore is not None:
        return st.datastores_free.get(vm.datastore, -1) >= vm.disk_bytes
    return any(free >= vm.disk_bytes for free in st.datastores_free.values()) or vm.disk_bytes == 0


def least_loaded(hosts: Iterable[HostView], vm: VmRecord) -> HostView | None:
    """The fitting host with the lowest CPU load (then most free memory, then name); None if none fits."""
    best: HostView | None = None
    best_key: tuple[float, int, str] | None = None
    for h in hosts:
        if not fits(h, vm):
            continue
        assert h.status is not None
        key = (h.status.load.cpu, -h.status.memory_free, h.info.name)
        if best_key is None or key < best_key:
            best, best_key = h, key
    return best
