"""What a migration will cost, shown before a person starts it: :func:`hikkoshi.migrate.predict.predict`
fed with what the dashboard knows of the VM, and the assumptions it had to make, said on the page.

The VM's memory and disk sizes come from its agent; its dirty rate from its last migration's report
(QEMU measured it then), else it is unknown and taken as 0; the link is the one the dashboard was told
(``--link``). A thin disk's allocated bytes are not known: its size is the bound used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hikkoshi.migrate.predict import Disk, Link, Migration, Mode, predict
from hikkoshi.web.views import VmView

_MIB = 1 << 20


@dataclass(frozen=True)
class LinkAssumption:
    """The link a migration is predicted over (the dashboard's ``--link RATE,RTT``)."""

    bandwidth: float = 125e6
    """Bytes per second (1 Gbit/s by default)."""
    rtt_ms: float = 0.5


def prediction_for(vm: VmView, storage: str, link: LinkAssumption) -> dict[str, Any]:
    """``{"prediction": Prediction.to_json(), "assumptions": [...]}`` for moving ``vm`` with ``storage``;
    ``{"error": ...}`` when the VM's size is unknown."""
    if not vm.memory_mib:
        return {"error": "the VM's memory size is not known: no prediction"}
    assumptions = [f"link {link.bandwidth * 8 / 1e6:g} Mbit/s, {link.rtt_ms:g} ms RTT (--link)"]
    if vm.last_dirty_rate_mib_s is not None:
        dirty = vm.last_dirty_rate_mib_s * _MIB
        assumptions.append(f"dirty rate {vm.last_dirty_rate_mib_s:g} MiB/s (measured by its last migration)")
    else:
        dirty = 0.0
        assumptions.append("dirty rate unknown (never migrated): taken as 0")
    if storage != "shared" and vm.disks:
        assumptions.append("disks counted at their full size (allocated bytes are not known)")
    model = Migration(
        memory_bytes=vm.memory_mib * _MIB,
        dirty_rate=dirty,
        link=Link(bandwidth=link.bandwidth, rtt_ms=link.rtt_ms),
        mode=Mode(storage),
        disks=tuple(Disk(size=d.size, allocated=d.size) for d in vm.disks),
    )
    return {"prediction": predict(model).to_json(), "assumptions": assumptions}


def parse_link(text: str) -> LinkAssumption:
    """``RATE[,RTT]``: ``1Gbit``, ``100Mbit,20ms``, ``500M`` (bytes/s)."""
    from hikkoshi.block.throttle import parse_rate

    rate, _, rtt = text.partition(",")
    try:
        bandwidth = parse_rate(rate)
        rtt_ms = float(rtt.removesuffix("ms")) if rtt else 0.5
    except ValueError:
        bandwidth, rtt_ms = None, 0.0
    if not bandwidth or bandwidth <= 0 or rtt_ms < 0:
        raise ValueError(f"--link {text!r}: expected RATE[,RTT], e.g. 1Gbit,0.5ms")
    return LinkAssumption(bandwidth=float(bandwidth), rtt_ms=rtt_ms)
