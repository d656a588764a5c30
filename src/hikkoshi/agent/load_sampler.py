"""Sampling this host's VMs' load every few seconds into a :class:`LoadWindow` (which the host's
published status carries to etcd): each running VM's QEMU process from ``/proc`` (CPU time of all its
threads, resident memory) and its NBD service's ``stats`` (bytes read and written, request latency);
every few samples, its memory's dirty rate (QEMU's ``calc-dirty-rate`` over a second; never while the
VM migrates, and a migration waits for a measurement under way to end), what a migration's prediction
needs most.

The measurement samples pages (QEMU's default mode), not the dirty-bitmap mode that counts every page:
on Debian's QEMU 7.2 under TCG, ``calc-dirty-rate`` in dirty-bitmap mode kills QEMU with SIGSEGV
(reproduced on a booting test guest: ``{"execute": "calc-dirty-rate", "arguments": {"calc-time": 1,
"mode": "dirty-bitmap"}}``, exit 139). A load figure must never cost a guest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from hikkoshi.agent.host import Host
from hikkoshi.agent.load_window import DatastoreLatency, LoadWindow, Raw
from hikkoshi.migrate import qmp_migration as qm
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.nbd.control import ControlError, control_request
from hikkoshi.vm.errors import VmError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.agent.load")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def proc_counters(pid: int) -> tuple[int, int] | None:
    """(CPU ticks of all threads, resident bytes) of process ``pid``; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12]), int(statm.split()[1]) * PAGE


def latency_histogram(stats: dict[str, Any]) -> tuple[int, ...]:
    """The VM's exports' request latency counts (log2 microsecond buckets, since the service started),
    summed bucket by bucket."""
    out: list[int] = []
    for s in stats.values():
        hist = (s.get("latency_us") or {}).get("histogram_log2") if isinstance(s, dict) else None
        if not isinstance(hist, list):
            continue
        if len(out) < len(hist):
            out += [0] * (len(hist) - len(out))
        for i, n in enumerate(hist):
            out[i] += int(n)
    return tuple(out)


def tap_bytes(taps: object) -> int:
    """Bytes received and sent so far by the VM's taps (state's ``taps``: NIC index -> tap name)."""
    if not isinstance(taps, dict):
        return 0
    total = 0
    for tap in taps.values():
        if not isinstance(tap, str) or "/" in tap:
            continue
        for counter in ("rx_bytes", "tx_bytes"):
            with contextlib.suppress(OSError, ValueError):
                total += int(Path(f"/sys/class/net/{tap}/statistics/{counter}").read_text())
    return total


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

    def __init__(self, host: Host, interval: float = 10.0, size: int = 30, dirty_every: int = 3) -> None:
        self.host = host
        self.interval = interval
        self.window = LoadWindow(size, os.sysconf("SC_CLK_TCK"))
        self.latency = DatastoreLatency(size)
        self.datastores: dict[str, tuple[str, int]] = {}
        """VM uuid -> (uuid of the datastore of its disks, bytes they take)."""
        self.dirty_every = max(1, dirty_every)
        self.dirty: dict[str, float] = {}
        """VM uuid -> bytes per second its memory was dirtied, last measured."""
        self._samples = 0

    async def _dirty_rate(self, uuid: str, home: VmHome, spec: VmSpec, due: bool) -> None:
        """Read the last measurement of the VM's dirty rate; start the next one if ``due``."""
        side = VmSide(home, spec, "vm")
        try:
            rate = await qm.dirty_rate(side)
            if rate is not None:
                self.dirty[uuid] = rate * MIB
            if due and (await qm.query(side)).status in qm.IDLE:
                await qm.calc_dirty_rate(side, 1)  # page sampling: see the module's docstring
        except SideError as exc:  # a VM stopping, a QEMU that cannot measure: no figure this time
            log.debug("VM %s: no dirty rate (%s)", spec.name, exc)

    async def sample(self) -> None:
        """Read every running VM once."""
        seen = []
        histograms: dict[str, tuple[str, tuple[int, ...]]] = {}
        due = self._samples % self.dirty_every == 0
        self._samples += 1
        for name, (ds_name, home) in self.host.homes().items():
            try:
                state = home.read_state()
                spec = home.load_spec()
            except (OSError, ValueError, VmError):
                continue  # a home leaving (a migration's clean-up) or not readable: not sampled now
            uuid = str(spec.uuid)
            pid = state.get("qemu_pid")
            if not pid or not home.is_running():
                continue
            counters = await asyncio.to_thread(proc_counters, int(pid))
            if counters is None:
                continue
            stats = await _nbd_stats(home)
            read, written, lat = nbd_counters(stats)
            net = tap_bytes(state.get("taps"))
            self.window.add(uuid, Raw(time.monotonic(), counters[0], counters[1], read, written, lat, net))
            store = self.host.stores.get(ds_name)
            if store is not None:
                histograms[uuid] = (str(store.uuid), latency_histogram(stats))
            allocated = 0
            for disk in spec.disks:
                with contextlib.suppress(OSError):
                    allocated += home.disk_path(disk).stat().st_blocks * 512
            self.datastores[uuid] = (str(store.uuid) if store else "", allocated)
            if state.get("state") == "running":
                await self._dirty_rate(uuid, home, spec, due)
            seen.append(uuid)
            log.debug("VM %s sampled", name)
        self.window.keep(seen)
        self.latency.add(histograms)
        for table in (self.datastores, self.dirty):
            for u in [u for u in table if u not in seen]:
                del table[u]

    def loads(self) -> dict[str, Any]:
        """VM uuid -> its :class:`VmLoad` (for the host's status)."""
        out = {}
        for uuid in self.window.uuids():
            store, allocated = self.datastores.get(uuid, ("", 0))
            got = self.window.load(uuid, store or None, allocated)
            rate = self.dirty.get(uuid)
            out[uuid] = got if rate is None else got.model_copy(update={"dirty_rate": round(rate, 1)})
        return out

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # a figure missing this time is no reason to stop sampling
                log.exception("sampling the VMs' load failed")
            await asyncio.sleep(self.interval)
