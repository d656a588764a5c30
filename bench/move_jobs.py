"""Processes and measurements of the storage-move benchmark (bench/run_move.py).

Two servers serve the same image as an NBD export named `disk` on 127.0.0.1:

- ours: `hikkoshi nbd serve IMAGE --export disk --listen 127.0.0.1:0 --control unix:SOCK`, moved with
  `hikkoshi nbd move --control unix:SOCK --to NEWPATH --json --mode mirror|dbt`;
- QEMU: `qemu-storage-daemon` with the image as a `file` + `raw` node exported over NBD and a QMP
  monitor on a Unix socket; moved with `blockdev-add` of a pre-created sparse target and
  `blockdev-mirror sync=full` (copy-mode `background` or `write-blocking`), `job-complete` at
  BLOCK_JOB_READY, done at BLOCK_JOB_COMPLETED.

Both run in their own session with a parent-death signal and are stopped by pid (bench.proxy_jobs.Daemon).
The image is a sparse file with a fixed share of random data, made once per run as a template and copied
(holes kept) for every move, since our move deletes its source.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from bench.nbd_servers import free_port, spawn_logged
from bench.proxy_jobs import HOST, Daemon, JobError, control_request

EXPORT = "disk"
MIB = 1 << 20
#: The template alternates data and holes in strides of this size.
STRIDE = 16 * MIB

_JOB_ID = "move0"
_END_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


# --- images ---------------------------------------------------------------------------------------------


def make_template(path: Path, size: int, allocated: float) -> int:
    """A sparse `size`-byte file: in every STRIDE, the first `allocated` share (whole MiB) is random data.

    Returns the allocated bytes as the file system reports them (st_blocks).
    """
    if size % STRIDE:
        raise ValueError(f"the image size must be a multiple of {STRIDE >> 20} MiB")
    data_per_stride = max(1, round(allocated * (STRIDE // MIB))) * MIB
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            for start in range(0, size, STRIDE):
                for off in range(start, start + data_per_stride, MIB):
                    os.pwrite(fd, os.urandom(MIB), off)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return allocated_bytes(path)


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def copy_sparse(src: Path, dst: Path) -> float:
    """Copy `src` to a new `dst` keeping its holes (SEEK_DATA/SEEK_HOLE, copy_file_range); fsync it.

    Returns the seconds taken. The copy's data is left in the page cache (both servers read through it).
    """
    t0 = time.perf_counter()
    size = src.stat().st_size
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(dfd, size)
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    break
                hole = os.lseek(sfd, data, os.SEEK_HOLE)
                off = data
                while off < hole:
                    n = os.copy_file_range(sfd, dfd, hole - off, off, off)
                    if n <= 0:
                        raise OSError(f"copy_file_range returned {n} at {off}")
                    off += n
                pos = hole
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return time.perf_counter() - t0


def remove_files(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


# --- our server and our move ----------------------------------------------------------------------------


def ours_argv(hikkoshi: Path, image: Path, control: Path) -> list[str]:
    return [
        str(hikkoshi),
        "nbd",
        "serve",
        str(image),
        "--export",
        EXPORT,
        "--listen",
        f"{HOST}:0",
        "--control",
        f"unix:{control}",
    ]


def ours_move_argv(hikkoshi: Path, control: Path, dest: Path, mode: str) -> list[str]:
    return [
        str(hikkoshi),
        "nbd",
        "move",
        "--control",
        f"unix:{control}",
        "--to",
        str(dest),
        "--json",
        "--mode",
        mode,
    ]


@dataclass
class MoveOutcome:
    """One move, whoever did it."""

    seconds: float  # the job: ours from the server's own `elapsed`; QEMU from target creation to COMPLETED
    wall_s: float  # the runner's view: ours from starting the CLI to its exit; QEMU as `seconds`
    window: tuple[float, float]  # the job's start and end, Unix time (s)
    details: dict[str, Any] = field(default_factory=dict)


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line][-lines:]
    return " | ".join(kept) if kept else "(no output)"


def run_ours_move(argv: list[str], control: Path, timeout_s: float) -> MoveOutcome:
    """Run `hikkoshi nbd move ... --json` to its end; the final status it prints.

    While the CLI starts, the runner asks the server's control socket for `move-status` every 10 ms
    until the move is there, to learn when the server started it (Unix time now - `elapsed`); the
    requests stop once it is seen, so they do not load the server during the move.
    """
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    started_at: float | None = None
    exact = True
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        while started_at is None and proc.poll() is None and time.perf_counter() < deadline:
            try:
                before = time.time()
                seen = control_request(control, "move-status", timeout_s=5.0)
                after = time.time()
            except (JobError, OSError):  # no move yet
                time.sleep(0.01)
                continue
            started_at = (before + after) / 2 - float(seen["elapsed"])
            exact = seen["phase"] not in ("done", "failed", "cancelled")
        out, err = proc.communicate(timeout=max(1.0, deadline - time.perf_counter()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    wall = time.perf_counter() - t0
    start = out.find("{")
    if start < 0:
        raise JobError(f"hikkoshi nbd move exited {proc.returncode}: {_tail(err + out)}")
    try:
        status, _ = json.JSONDecoder().raw_decode(out[start:])
    except ValueError as exc:
        raise JobError(f"hikkoshi nbd move printed no JSON status: {exc}") from exc
    if proc.returncode != 0 or status.get("phase") != "done":
        raise JobError(
            f"move ended with exit {proc.returncode}, phase {status.get('phase')}: {status.get('error')}"
        )
    elapsed = float(status["elapsed"])
    if started_at is None:  # never seen running: place it just before the CLI's exit
        started_at, exact = time.time() - elapsed, False
    return MoveOutcome(
        seconds=elapsed,
        wall_s=wall,
        window=(started_at, started_at + elapsed),
        details={"status": status, "window_exact": exact},
    )


# --- guest writes during the move -----------------------------------------------------------------------


def clat_window(prefix: Path, t0: float, t1: float) -> dict[str, Any]:
    """fio's per-write completion latencies (its `PREFIX_clat.1.log`, Unix-ms stamps) between t0 and t1."""
    lats: list[float] = []
    lo, hi = t0 * 1000.0, t1 * 1000.0
    with open(prefix.with_name(prefix.name + "_clat.1.log")) as f:
        for line in f:
            parts = line.split(",")
            if len(parts) < 3 or parts[2].strip() != "1":
                continue
            stamp = float(parts[0])
            if lo <= stamp <= hi:
                lats.append(float(parts[1]) / 1000.0)
    seconds = t1 - t0
    if len(lats) < 2 or seconds <= 0:
        raise JobError(f"fio logged {len(lats)} writes during the move")
    q = statistics.quantiles(lats, n=1000, method="inclusive")
    return {
        "writes": len(lats),
        "seconds": round(seconds, 4),
        "iops": round(len(lats) / seconds, 1),
        "clat_p50_us": round(q[499], 1),
        "clat_p90_us": round(q[899], 1),
        "clat_p99_us": round(q[989], 1),
        "clat_p99_9_us": round(q[998], 1),
        "clat_max_us": round(max(lats), 1),
        "clat_mean_us": round(statistics.fmean(lats), 1),
    }


def remove_fio_logs(prefix: Path) -> None:
    for kind in ("clat", "slat", "lat"):
        prefix.with_name(f"{prefix.name}_{kind}.1.log").unlink(missing_ok=True)


# --- QEMU -----------------------------------------------------------------------------------------------


def qsd_argv(qsd: str, image: Path, port: int, qmp: Path) -> list[str]:
    return [
        qsd,
        "--blockdev",
        f"driver=file,filename={image},node-name=file0",
        "--blockdev",
        "driver=raw,file=file0,node-name=disk",
        "--nbd-server",
        f"addr.type=inet,addr.host={HOST},addr.port={port}",
        "--export",
        f"type=nbd,id=e0,node-name=disk,name={EXPORT},writable=on",
        "--chardev",
        f"socket,path={qmp},server=on,wait=off,id=qmp0",
        "--monitor",
        "chardev=qmp0",
    ]


class QsdDaemon(Daemon):
    """qemu-storage-daemon on a free port; ready once its QMP socket exists and nbdinfo can connect."""

    def __init__(self, qsd: str, image: Path, qmp: Path, log_path: Path) -> None:
        super().__init__("qemu-storage-daemon", [], log_path)
        self.qsd = qsd
        self.image = image
        self.qmp = qmp

    def start(self, ready_timeout_s: float = 30.0, attempts: int = 3) -> None:
        last: JobError | None = None
        for _ in range(attempts):
            self.port = free_port()
            self.argv = qsd_argv(self.qsd, self.image, self.port, self.qmp)
            self.qmp.unlink(missing_ok=True)
            self.t_start = time.perf_counter()
            self.proc, self._log_offset = spawn_logged(self.argv, self.log_path)
            try:
                self._wait_ready(ready_timeout_s)
                self.t_ready = time.perf_counter()
                return
            except JobError as exc:  # e.g. lost the race for the port
                last = exc
                self.stop()
        assert last is not None
        raise last

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise JobError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if self.qmp.exists():
                probe = subprocess.run(
                    ["nbdinfo", "--size", self.uri(EXPORT)],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
                if probe.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise JobError(f"{self.name} not ready after {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        super().stop()
        self.qmp.unlink(missing_ok=True)


async def _qemu_mirror(qmp: Path, target: Path, size: int, copy_mode: str) -> MoveOutcome:
    client = QMPClient("hikkoshi-bench")
    await client.connect(str(qmp))
    try:
        events: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        wall0 = time.time()
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        await client.execute(
            "blockdev-add", {"driver": "file", "filename": str(target), "node-name": "tfile"}
        )
        await client.execute("blockdev-add", {"driver": "raw", "file": "tfile", "node-name": "target"})
        names = ("BLOCK_JOB_READY", "BLOCK_JOB_ERROR", *_END_EVENTS)
        with client.listener(names) as listener:
            t_cmd = time.perf_counter()
            await client.execute(
                "blockdev-mirror",
                {
                    "job-id": _JOB_ID,
                    "device": "disk",
                    "target": "target",
                    "sync": "full",
                    "copy-mode": copy_mode,
                },
            )
            t_ready: float | None = None
            async for event in listener:
                name = str(event["event"])
                data = event.get("data")
                events.append({"t": round(time.perf_counter() - t0, 4), "event": name, "data": data})
                if name == "BLOCK_JOB_READY" and t_ready is None:
                    t_ready = time.perf_counter()
                    await client.execute("job-complete", {"id": _JOB_ID})
                elif name in _END_EVENTS:
                    break
        t_end = time.perf_counter()
        wall1 = time.time()
        last = events[-1]
        error = last["data"].get("error") if isinstance(last["data"], dict) else None
        if last["event"] != "BLOCK_JOB_COMPLETED" or error:
            raise JobError(f"mirror ended with {last['event']}: {error}")
        details = {
            "events": events,
            "prepare_s": round(t_cmd - t0, 4),
            "to_ready_s": None if t_ready is None else round(t_ready - t0, 4),
            "ready_to_completed_s": None if t_ready is None else round(t_end - t_ready, 4),
            "command_to_completed_s": round(t_end - t_cmd, 4),
        }
        return MoveOutcome(seconds=t_end - t0, wall_s=t_end - t0, window=(wall0, wall1), details=details)
    finally:
        await client.disconnect()


def run_qemu_mirror(qmp: Path, target: Path, size: int, copy_mode: str, timeout_s: float) -> MoveOutcome:
    """Create the target, mirror the export's node onto it, pivot; raises JobError if it did not finish."""

    async def bounded() -> MoveOutcome:
        try:
            return await asyncio.wait_for(_qemu_mirror(qmp, target, size, copy_mode), timeout_s)
        except TimeoutError as exc:
            raise JobError(f"QEMU mirror not completed after {timeout_s:.0f} s") from exc

    try:
        return asyncio.run(bounded())
    except (OSError, EOFError, QMPError) as exc:
        raise JobError(f"QMP: {type(exc).__name__}: {exc}") from exc
