"""The peer of `hikkoshi migrate` in bench.run_migrate: QEMU's own live migration, done the way libvirt does.

Same guest, same spec: the QEMU command line is our VM's (:func:`hikkoshi.vm.qemu.qemu_command`, so the
virtual hardware is identical), with three changes: QEMU listens for QMP itself, the console goes to a
file of this run, and the disk's protocol node is a plain raw file (``-blockdev file`` under the same
``raw`` node and virtio-blk device) or, for shared storage, an NBD export of ``qemu-storage-daemon``
serving that file to both QEMUs. Everything is driven over QMP (``qemu.qmp``):

non-shared (libvirt's ``--copy-storage-all``):

1. destination QEMU started with ``-S -incoming defer`` on its own empty (sparse) raw file;
   ``nbd-server-start`` on 127.0.0.1:PORT and ``block-export-add`` (writable) of its disk node;
2. source: ``blockdev-add`` of an NBD node on that export, ``blockdev-mirror sync=full`` with
   ``copy-mode=background`` (libvirt's default) or ``write-blocking`` (its synchronous-writes flag);
   wait for ``BLOCK_JOB_READY``;
3. ``migrate-set-parameters downtime-limit=300 max-bandwidth=1 TiB/s`` (libvirt's "unlimited"),
   ``migrate-incoming tcp:127.0.0.1:PORT2`` on the destination, ``migrate`` on the source; wait for the
   ``completed`` MIGRATION event;
4. ``block-job-cancel`` of the ready mirror on the source (it copies what is still dirty, then ends with
   the target in sync), ``nbd-server-stop`` and ``cont`` on the destination; ``quit`` on the source.

shared: steps 1-2 and the mirror of step 4 fall away.

Across the WAN emulator the migration stream and the mirror's NBD connection go through relays of one
:class:`hikkoshi.lab.wan.WanPath` (clients at site A, the source), like ``hikkoshi migrate --wan`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, Message, QMPClient, QMPError

from bench.nbd_servers import free_port, spawn_logged, stop_pid
from hikkoshi.guest.diskwriter import DiskwriterError, verify_diskwriter_image
from hikkoshi.lab.link_model import WanParams
from hikkoshi.lab.wan import WanPath
from hikkoshi.vm.accel import Accel
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.qemu import qemu_command as vm_qemu_command
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.spec import VmSpec

HOST = "127.0.0.1"
DOWNTIME_LIMIT_MS = 300
MAX_BANDWIDTH = 1 << 40  # bytes/s: "unlimited", as ours and libvirt set it (QEMU's default is 32 MiB/s)
SHARED = "shared"
STORAGE_MODES = ("background", "write-blocking", SHARED)
MIGRATION_END = ("completed", "failed", "cancelled")
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 90.0

DONE_RE = re.compile(r"HIKKOSHI-DISKWRITER DONE run=(\d+) last=(\d+) written=\d+ records=\d+ OK")
FAIL_RE = re.compile(r"HIKKOSHI-DISKWRITER FAIL .*")
PROGRESS_RE = re.compile(r"HIKKOSHI-DISKWRITER PROGRESS run=\d+ durable=\d+")
CRASH_RE = re.compile(r"(BUG: .*|Oops: .*|Kernel panic .*|general protection fault.*)")


class PeerError(RuntimeError):
    """The QEMU migration did not complete (or its processes misbehaved)."""


# --- the guest's own verdict --------------------------------------------------------------------------------


def ready_tags(workload: str) -> list[str]:
    """Console lines that say the workload runs (busy: both of its parts)."""
    if workload == "busy":
        return ["HIKKOSHI-DISKWRITER READY", "HIKKOSHI-MEMDIRTY READY"]
    return ["HIKKOSHI-IDLE READY"]


def check_guest(console: str, workload: str, run: int | None, image: Path) -> dict[str, Any]:
    """What the guest said after it was stopped on the destination, and the image checked from the host.

    busy: the disk writer's final ``DONE ... OK`` (it compared its whole ring on the disk with its copy in
    memory) and :func:`verify_diskwriter_image` on the image with that run and last durable record.
    idle: the workload's ``HIKKOSHI-IDLE STOPPED`` (the guest ran on the destination and obeyed the button).
    """
    crash = CRASH_RE.search(console)
    if crash is not None:
        return {"ok": False, "detail": f"the guest kernel crashed on the destination: {crash[0].strip()}"}
    if not console.strip():
        return {"ok": False, "detail": "the guest printed nothing on the destination (hung?)"}
    if workload != "busy":
        ok = "HIKKOSHI-IDLE STOPPED" in console
        return {"ok": ok, "detail": "IDLE STOPPED seen" if ok else "no IDLE STOPPED on the console"}
    fail = FAIL_RE.search(console)
    done = DONE_RE.search(console)
    if fail is not None:
        return {"ok": False, "detail": fail[0].strip()}
    if done is None:
        return {"ok": False, "detail": "no DISKWRITER DONE line: " + console[-300:].replace("\n", " | ")}
    last = int(done[2])
    try:
        report = verify_diskwriter_image(image, run=int(done[1]) if run is None else run, durable=last)
    except (DiskwriterError, OSError) as exc:
        return {"ok": False, "detail": f"guest said {done[0]!r}, but the image does not verify: {exc}"}
    return {"ok": True, "detail": f"{done[0]}; image verified up to record {report.last}"}


def progress_lines(console: str) -> int:
    return len(PROGRESS_RE.findall(console))


def exists(path: Path) -> bool:
    return path.exists()


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --- command lines ------------------------------------------------------------------------------------------


def _opt(value: str) -> str:
    return value.replace(",", ",,")


def file_node(disk: str, path: Path) -> dict[str, Any]:
    return {"driver": "file", "node-name": f"proto-{disk}", "filename": str(path), "discard": "unmap"}


def nbd_node(disk: str, socket: Path) -> dict[str, Any]:
    return {
        "driver": "nbd",
        "node-name": f"proto-{disk}",
        "server": {"type": "unix", "path": str(socket)},
        "export": disk,
        "discard": "unmap",
    }


def peer_argv(
    spec: VmSpec,
    home: VmHome,
    *,
    accel: Accel,
    qmp: Path,
    console: Path,
    protocol: dict[str, Any],
    incoming: bool,
) -> list[str]:
    """Our VM's QEMU command line with QEMU's own QMP server, this run's console file and ``protocol`` as
    the disk's protocol node (instead of our NBD service); ``-incoming defer`` for a destination."""
    if len(spec.disks) != 1:
        raise PeerError("the peer handles VMs with exactly one disk")
    base = vm_qemu_command(spec, home, RunDir(Path("/nonexistent")), accel=accel)
    out: list[str] = []
    replaced: list[str] = []
    i = 0
    while i < len(base):
        arg, value = base[i], base[i + 1] if i + 1 < len(base) else ""
        if arg == "-chardev" and value.startswith("socket,id=qmp,"):
            out += [arg, f"socket,id=qmp,path={_opt(str(qmp))},server=on,wait=off"]
            replaced.append("qmp")
        elif arg == "-chardev" and value.startswith("file,id=console,"):
            out += [arg, f"file,id=console,path={_opt(str(console))}"]
            replaced.append("console")
        elif arg == "-blockdev" and json.loads(value).get("driver") == "nbd":
            out += [arg, json.dumps(protocol)]
            replaced.append("protocol")
        elif arg == "-blockdev" and json.loads(value).get("driver") == "raw":
            node = json.loads(value)
            node["file"] = protocol["node-name"]
            out += [arg, json.dumps(node)]
            replaced.append("format")
        else:
            out.append(arg)
            i += 1
            continue
        i += 2
    if sorted(replaced) != ["console", "format", "protocol", "qmp"]:
        raise PeerError(f"unexpected QEMU command line from hikkoshi.vm.qemu (replaced {replaced})")
    if incoming:
        out += ["-incoming", "defer"]
    return out


def qsd_argv(qsd: str, image: Path, socket: Path, export: str) -> list[str]:
    return [
        qsd,
        "--blockdev",
        f"driver=file,filename={_opt(str(image))},node-name=file0",
        "--nbd-server",
        f"addr.type=unix,addr.path={_opt(str(socket))}",
        "--export",
        f"type=nbd,id=e0,node-name=file0,name={export},writable=on",
    ]


# --- processes ----------------------------------------------------------------------------------------------


def _tail(path: Path, offset: int = 0, chars: int = 800) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-chars:].strip()
    except OSError:
        return ""


async def wait_exit(proc: subprocess.Popen[bytes], limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def wait_console(
    path: Path, needles: list[str], limit_s: float, proc: subprocess.Popen[bytes] | None = None
) -> float:
    """Poll ``path`` until every needle is in it; the monotonic time they were."""
    deadline = time.monotonic() + limit_s
    while True:
        text = read_text(path)
        if all(n in text for n in needles):
            return time.monotonic()
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"QEMU exited ({proc.returncode}) before {needles}: {text[-500:]}")
        if time.monotonic() > deadline:
            raise PeerError(f"no {needles} on {path.name} within {limit_s:.0f} s: {text[-500:]}")
        await asyncio.sleep(0.05)


# --- QMP ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerEvent:
    name: str
    data: dict[str, Any]
    qemu_time: float
    """QEMU's own timestamp of the event (the host's real-time clock), in seconds."""
    received: float
    """time.monotonic() when this runner read it."""


def _event(msg: Message) -> PeerEvent:
    stamp = msg.get("timestamp")
    seconds = 0.0
    if isinstance(stamp, dict):
        seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    data = msg.get("data")
    return PeerEvent(str(msg.get("event")), data if isinstance(data, dict) else {}, seconds, time.monotonic())


class Qmp:
    """One QEMU's QMP session; every event is kept, commands are logged for the result file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client = QMPClient(name)
        self.listener = EventListener()
        self.events: list[PeerEvent] = []
        self.sent: list[str] = []
        self.connected = False

    async def connect(self, path: Path, proc: subprocess.Popen[bytes], limit_s: float = 30.0) -> None:
        deadline = time.monotonic() + limit_s
        while True:
            if exists(path):
                try:
                    await self.client.connect(str(path))
                    break
                except (OSError, QMPError):
                    self.client = QMPClient(self.name)
            if proc.poll() is not None:
                raise PeerError(f"{self.name}: QEMU exited ({proc.returncode}) before its QMP socket")
            if time.monotonic() > deadline:
                raise PeerError(f"{self.name}: no QMP socket within {limit_s:.0f} s")
            await asyncio.sleep(0.01)
        self.client.register_listener(self.listener)
        self.connected = True

    async def cmd(self, command: str, args: Mapping[str, object] | None = None) -> Any:
        self.sent.append(f"{command} {json.dumps(args)}" if args else command)
        try:
            return await self.client.execute(command, args)
        except QMPError as exc:
            raise PeerError(f"{self.name}: {command}: {exc}") from exc

    def _drain(self) -> None:
        for msg in self.listener.clear():
            self.events.append(_event(msg))

    def mark(self) -> int:
        """An index into the events: later waits look only at events from here on."""
        self._drain()
        return len(self.events)

    def find(self, name: str, since: int = 0) -> PeerEvent | None:
        self._drain()
        return next((e for e in self.events[since:] if e.name == name), None)

    async def wait_event(
        self,
        name: str,
        since: int,
        limit_s: float,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> PeerEvent:
        deadline = time.monotonic() + limit_s
        i = since
        while True:
            while i < len(self.events):
                event = self.events[i]
                i += 1
                if event.name == name and (match is None or match(event.data)):
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"{self.name}: no {name} event within {limit_s:.0f} s")
            with contextlib.suppress(TimeoutError):
                self.events.append(_event(await asyncio.wait_for(self.listener.get(), left)))

    async def close(self) -> None:
        if self.connected:
            self.connected = False
            with contextlib.suppress(Exception):
                self.client.remove_listener(self.listener)
            with contextlib.suppress(Exception):
                await self.client.disconnect()


# --- one migration ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCase:
    """One migration the QEMU way: ``storage`` is a mirror copy mode or ``shared``."""

    storage: str
    spec: VmSpec
    home: VmHome
    accel: Accel
    work: Path
    workload: str
    run: int | None
    settle_s: float
    wan: WanParams | None = None
    qsd: str = "qemu-storage-daemon"


class PeerRun:
    """Runs one :class:`PeerCase`; every process it starts is stopped by pid whatever happens."""

    def __init__(self, case: PeerCase) -> None:
        self.c = case
        self.procs: list[subprocess.Popen[bytes]] = []
        self.commands: dict[str, list[str]] = {}
        self.rec: dict[str, Any] = {}
        w = case.work
        self.src_console = w / "src-console.log"
        self.dst_console = w / "dst-console.log"
        self.src_qmp_path = w / "src-qmp.sock"
        self.dst_qmp_path = w / "dst-qmp.sock"
        self.qsd_socket = w / "qsd.sock"
        self.src_image = case.home.disk_path(case.spec.disks[0])
        self.dst_image = w / "dst.raw"
        self.log = w / "peer.log"
        self.src = Qmp("source")
        self.dst = Qmp("destination")

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        proc, _ = spawn_logged(argv, self.log)
        self.procs.append(proc)
        self.commands[name] = argv
        return proc

    def run(self, timeout: float) -> dict[str, Any]:
        try:
            return asyncio.run(asyncio.wait_for(self._run(), timeout))
        except TimeoutError as exc:
            raise PeerError(f"not done within {timeout:.0f} s: {_tail(self.log)}") from exc
        finally:
            for proc in reversed(self.procs):
                stop_pid(proc)

    async def _run(self) -> dict[str, Any]:
        try:
            return await self._migrate_and_check()
        finally:
            await self.src.close()
            await self.dst.close()

    async def _migrate_and_check(self) -> dict[str, Any]:
        c = self.c
        disk = c.spec.disks[0]
        shared = c.storage == SHARED
        for path in (
            self.src_console,
            self.dst_console,
            self.src_qmp_path,
            self.dst_qmp_path,
            self.qsd_socket,
        ):
            path.unlink(missing_ok=True)
        if shared:
            self.spawn("qemu-storage-daemon", qsd_argv(c.qsd, self.src_image, self.qsd_socket, disk.name))
            deadline = time.monotonic() + 30
            while not exists(self.qsd_socket):
                if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise PeerError(f"qemu-storage-daemon did not start: {_tail(self.log)}")
                await asyncio.sleep(0.02)
            src_node = dst_node = nbd_node(disk.name, self.qsd_socket)
        else:
            with self.dst_image.open("wb") as f:
                f.truncate(disk.size)
            src_node, dst_node = file_node(disk.name, self.src_image), file_node(disk.name, self.dst_image)
        # --- the source boots and its workload starts
        argv = peer_argv(
            c.spec,
            c.home,
            accel=c.accel,
            qmp=self.src_qmp_path,
            console=self.src_console,
            protocol=src_node,
            incoming=False,
        )
        boot0 = time.monotonic()
        src_proc = self.spawn("source QEMU", argv)
        await self.src.connect(self.src_qmp_path, src_proc)
        await self.src.cmd("cont")
        ready = await wait_console(self.src_console, ready_tags(c.workload), BOOT_TIMEOUT, src_proc)
        self.rec["boot_to_ready_s"] = round(ready - boot0, 3)
        await asyncio.sleep(c.settle_s)
        # --- the migration
        nbd_port, mig_port = free_port(), free_port()
        async with contextlib.AsyncExitStack() as relays:
            t0 = time.monotonic()
            argv = peer_argv(
                c.spec,
                c.home,
                accel=c.accel,
                qmp=self.dst_qmp_path,
                console=self.dst_console,
                protocol=dst_node,
                incoming=True,
            )
            dst_proc = self.spawn("destination QEMU", argv)
            await self.dst.connect(self.dst_qmp_path, dst_proc)
            stream_to, mirror_to = f"{HOST}:{mig_port}", f"{HOST}:{nbd_port}"
            if c.wan is not None:
                wan_path = WanPath(c.wan)
                stream_relay = await relays.enter_async_context(wan_path.relay(stream_to, from_a=True))
                stream_to = f"{HOST}:{stream_relay.port}"
                if not shared:
                    mirror_relay = await relays.enter_async_context(wan_path.relay(mirror_to, from_a=True))
                    mirror_to = f"{HOST}:{mirror_relay.port}"
            self.rec["routes"] = {"stream": stream_to, "mirror": None if shared else mirror_to}
            events_on = {"capabilities": [{"capability": "events", "state": True}]}
            await self.dst.cmd("migrate-set-capabilities", events_on)
            job = f"mig-{disk.name}"
            if not shared:
                await self.dst.cmd(
                    "nbd-server-start",
                    {"addr": {"type": "inet", "data": {"host": HOST, "port": str(nbd_port)}}},
                )
                await self.dst.cmd(
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": f"mig-{disk.name}",
                        "node-name": f"disk-{disk.name}",
                        "name": disk.name,
                        "writable": True,
                    },
                )
                host, port = mirror_to.rsplit(":", 1)
                mark = self.src.mark()
                await self.src.cmd(
                    "blockdev-add",
                    {
                        "driver": "nbd",
                        "node-name": f"mig-target-{disk.name}",
                        "server": {"type": "inet", "host": host, "port": port},
                        "export": disk.name,
                    },
                )
                t_mirror = time.monotonic()
                await self.src.cmd(
                    "blockdev-mirror",
                    {
                        "job-id": job,
                        "device": f"disk-{disk.name}",
                        "target": f"mig-target-{disk.name}",
                        "sync": "full",
                        "copy-mode": c.storage,
                    },
                )
                ready_ev = await self.src.wait_event(
                    "BLOCK_JOB_READY", mark, 600, lambda d: d.get("device") == job
                )
                jobs = await self.src.cmd("query-block-jobs")
                self.rec["mirror"] = {
                    "to_ready_s": round(ready_ev.received - t_mirror, 3),
                    "len_bytes": next((j.get("len") for j in jobs if j.get("device") == job), None),
                }
            await self.src.cmd("migrate-set-capabilities", events_on)
            await self.src.cmd(
                "migrate-set-parameters",
                {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH},
            )
            await self.dst.cmd("migrate-incoming", {"uri": f"tcp:{HOST}:{mig_port}"})
            mark_src, mark_dst = self.src.mark(), self.dst.mark()
            t_migrate = time.monotonic()
            await self.src.cmd("migrate", {"uri": f"tcp:{stream_to}"})
            end = await self.src.wait_event(
                "MIGRATION", mark_src, 600, lambda d: d.get("status") in MIGRATION_END
            )
            status = end.data.get("status")
            if status != "completed":
                info = await self.src.cmd("query-migrate")
                raise PeerError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            t_completed = time.monotonic()
            cancel_ms = None
            if not shared:
                mark = self.src.mark()
                await self.src.cmd("block-job-cancel", {"device": job})
                done = await self.src.wait_event(
                    "BLOCK_JOB_COMPLETED", mark, 120, lambda d: d.get("device") == job
                )
                if done.data.get("error"):
                    raise PeerError(f"mirror ended with an error: {done.data['error']}")
                cancel_ms = round((done.received - t_completed) * 1000, 2)
            await self.dst.wait_event("MIGRATION", mark_dst, 120, lambda d: d.get("status") in MIGRATION_END)
            dinfo = await self.dst.cmd("query-migrate")
            if dinfo.get("status") != "completed":
                raise PeerError(f"the destination's incoming migration is {dinfo.get('status')}")
            if not shared:
                await self.dst.cmd("nbd-server-stop")
            mark_cont = self.dst.mark()
            await self.dst.cmd("cont")
            t_dest = time.monotonic()
            resume = await self.dst.wait_event("RESUME", mark_cont, 30)
            info = await self.src.cmd("query-migrate")
            for _ in range(100):
                # QEMU announces 'completed' before it has filled in total-time and downtime.
                if info.get("total-time"):
                    break
                await asyncio.sleep(0.01)
                info = await self.src.cmd("query-migrate")
            stop = self.src.find("STOP", mark_src)
            if not shared:
                with contextlib.suppress(PeerError):
                    await self.src.cmd("blockdev-del", {"node-name": f"mig-target-{disk.name}"})
            await self.src.cmd("quit")
            await self.src.close()
            if not await wait_exit(src_proc, 30):
                raise PeerError("the source QEMU did not quit")
            t_total = time.monotonic()
        ram = info.get("ram") or {}
        self.rec.update(
            downtime_ms=info.get("downtime"),
            gap_ms=round((resume.qemu_time - stop.qemu_time) * 1000, 2) if stop else None,
            to_destination_s=round(t_dest - t0, 3),
            total_s=round(t_total - t0, 3),
            memory_bytes=ram.get("transferred"),
            memory_total_bytes=ram.get("total"),
            memory_iterations=ram.get("dirty-sync-count"),
            qemu_total_time_ms=info.get("total-time"),
            setup_time_ms=info.get("setup-time"),
            migrate_s=round(t_completed - t_migrate, 3),
            mirror_cancel_ms=cancel_ms,
            cont_ms=round((t_dest - t_completed) * 1000, 2),
        )
        # --- the guest goes on on the destination; then the power button, and its verdict
        if c.workload == "busy":
            deadline = time.monotonic() + 60
            while progress_lines(read_text(self.dst_console)) < 2 and time.monotonic() < deadline:
                if dst_proc.poll() is not None:
                    break
                await asyncio.sleep(0.2)
            self.rec["progress_lines_on_destination"] = progress_lines(read_text(self.dst_console))
        await self.dst.cmd("system_powerdown")
        clean = await wait_exit(dst_proc, STOP_TIMEOUT)
        self.rec["stop"] = "acpi" if clean else "killed"
        image = self.src_image if shared else self.dst_image
        self.rec["check"] = check_guest(read_text(self.dst_console), c.workload, c.run, image)
        self.rec["qmp"] = {"source": self.src.sent, "destination": self.dst.sent}
        return self.rec
