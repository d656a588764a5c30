"""Sampling this host's VMs' load every few seconds into a :class:`LoadWindow` (which the host's
published status carries to etcd): each running VM's QEMU process from ``/proc`` (CPU time of all its
threads, resident memory) and its NBD service's ``stats`` (bytes read and written, request latency)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from hikkoshi.agent.host import Host
from hikkoshi.agent.load_window import LoadWindow, Raw
from hikkoshi.nbd.control import ControlError, control_request
from hikkoshi.vm.home import VmHome

log = logging.getLogger("hikkoshi.agent.load")
PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_counters(pid: int) -> tuple[int, int] | None:
    """(CPU ticks of all threads, resident bytes) of process ``pid``; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12]), int(statm.split()[1]) * PAGE


def nbd_counters(stats: dict[str, Any]) -> tuple[int, int, float]:
    """Bytes read, bytes written and the slowest export's p99 latency (ms) from a ``stats`` answer."""
    read = sum(int(s.get("bytes_read", 0)) for s in stats.values() if isinstance(s, dict))
    written = sum(int(s.get("bytes_written", 0)) for s in stats.values() if isinstance(s, dict))
    lat = max(
        (float((s.get("latency_us") or {}).get("p99", 0.0)) for s in stats.values() if isinstance(s, dict)),
        default=0.0,
    )
    return read, written, lat / 1000


async def _nbd_stats(home: VmHome) -> dict[str, Any]:
    control = home.read_state().get("nbd_control")
    if not isinstance(control, str):
        return {}
    try:
        got = await asyncio.wait_for(control_request(Path(control), "stats"), 5)
    except (OSError, ControlError, TimeoutError):
        return {}
    return got if isinstance(got, dict) else {}


class LoadSampler:
    """Keeps :attr:`window` fresh while :meth:`run` runs."""

    def __init__(self, host: Host, interval: float = 10.0, size: int = 30) -> None:
        self.host = host
        self.interval = interval
        self.window = LoadWindow(size, os.sysconf("SC_CLK_TCK"))
        self.datastores: dict[str, tuple[str, int]] = {}
        """VM uuid -> (uuid of the datastore of its disks, bytes they take)."""

    async def sample(self) -> None:
        """Read every running VM once."""
        seen = []
        for name, (ds_name, home) in self.host.homes().items():
            try:
                state = home.read_state()
                spec = home.load_spec()
            except (OSError, ValueError):
                continue
            uuid = str(spec.uuid)
            pid = state.get("qemu_pid")
            if not pid or not home.is_running():
                continue
            counters = await asyncio.to_thread(proc_counters, int(pid))
            if counters is None:
                continue
            read, written, lat = nbd_counters(await _nbd_stats(home))
            self.window.add(uuid, Raw(time.monotonic(), counters[0], counters[1], read, written, lat))
            store = self.host.stores.get(ds_name)
            allocated = 0
            for disk in spec.disks:
                with contextlib.suppress(OSError):
                    allocated += home.disk_path(disk).stat().st_blocks * 512
            self.datastores[uuid] = (str(store.uuid) if store else "", allocated)
            seen.append(uuid)
            log.debug("VM %s sampled", name)
        self.window.keep(seen)
        for u in [u for u in self.datastores if u not in seen]:
            del self.datastores[u]

    def loads(self) -> dict[str, Any]:
        """VM uuid -> its :class:`VmLoad` (for the host's status)."""
        out = {}
        for uuid in self.window.uuids():
            store, allocated = self.datastores.get(uuid, ("", 0))
            out[uuid] = self.window.load(uuid, store or None, allocated)
        return out

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # a figure missing this time is no reason to stop sampling
                log.exception("sampling the VMs' load failed")
            await asyncio.sleep(self.interval)
