"""The client workloads run against each NBD server: fio's nbd engine and nbdcopy.

fio runs one job over one NBD connection, time-based, with JSON written to a file (the nbd engine
prints a line of its own on stdout). nbdcopy copies the whole image, repeatedly until the run time
is used up, with --no-extents so that every byte is really transferred whatever the server says
about allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Unit = Literal["IOPS", "GB/s"]
Direction = Literal["read", "write"]

_MAX_NBDCOPY_PASSES = 200


class ClientError(RuntimeError):
    """fio or nbdcopy failed or produced no usable numbers."""


@dataclass(frozen=True)
class Workload:
    name: str
    tool: Literal["fio", "nbdcopy"]
    unit: Unit
    description: str
    direction: Direction = "read"
    rw: str = ""
    bs: str = ""
    iodepth: int = 0


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "randread-4k", "fio", "IOPS", "fio 4 KiB random read, iodepth 32", rw="randread", bs="4k", iodepth=32
    ),
    Workload(
        "randwrite-4k",
        "fio",
        "IOPS",
        "fio 4 KiB random write, iodepth 32",
        direction="write",
        rw="randwrite",
        bs="4k",
        iodepth=32,
    ),
    Workload(
        "seqread-1m", "fio", "GB/s", "fio 1 MiB sequential read, iodepth 8", rw="read", bs="1m", iodepth=8
    ),
    Workload("nbdcopy-read", "nbdcopy", "GB/s", "nbdcopy whole image to null:"),
    Workload("nbdcopy-write", "nbdcopy", "GB/s", "nbdcopy local file into the export", direction="write"),
)
WORKLOADS_BY_NAME: dict[str, Workload] = {w.name: w for w in WORKLOADS}


@dataclass
class Measurement:
    """One run of one workload against one server."""

    value: float
    commands: list[list[str]]
    wall_s: float
    details: dict[str, Any] = field(default_factory=dict)


def fio_argv(workload: Workload, uri: str, runtime_s: int, ramp_s: int, output: Path) -> list[str]:
    return [
        "fio",
        f"--name={workload.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        "--numjobs=1",
        "--time_based=1",
        f"--runtime={runtime_s}",
        f"--ramp_time={ramp_s}",
        "--norandommap=1",
        "--output-format=json",
        f"--output={output}",
    ]


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line][-lines:]
    return " | ".join(kept) if kept else "(no output)"


def _percentile_us(section: dict[str, Any], pct: str) -> float | None:
    table = section.get("clat_ns", {}).get("percentile", {})
    value = table.get(pct)
    return None if value is None else float(value) / 1000.0


def parse_fio_json(text: str, workload: Workload) -> tuple[float, dict[str, Any]]:
    """The workload's headline number and a summary of fio's JSON for one job."""
    start = text.find("{")
    if start < 0:
        raise ClientError(f"fio wrote no JSON: {_tail(text)}")
    try:
        doc = json.loads(text[start:])
        job: dict[str, Any] = doc["jobs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        raise ClientError(f"unreadable fio JSON: {exc}") from exc
    if job.get("error"):
        raise ClientError(f"fio job error {job['error']}")
    section: dict[str, Any] = job[workload.direction]
    io_bytes = int(section["io_bytes"])
    if io_bytes <= 0:
        raise ClientError("fio transferred no data")
    iops = float(section["iops"])
    bw_bytes = float(section["bw_bytes"])
    details: dict[str, Any] = {
        "iops": iops,
        "bw_bytes_per_s": bw_bytes,
        "io_bytes": io_bytes,
        "runtime_ms": int(section["runtime"]),
        "lat_mean_us": float(section["lat_ns"]["mean"]) / 1000.0,
        "clat_p50_us": _percentile_us(section, "50.000000"),
        "clat_p99_us": _percentile_us(section, "99.000000"),
        "clat_p99_9_us": _percentile_us(section, "99.900000"),
        "fio_usr_cpu_pct": float(job["usr_cpu"]),
        "fio_sys_cpu_pct": float(job["sys_cpu"]),
    }
    value = iops if workload.unit == "IOPS" else bw_bytes / 1e9
    return value, details


def run_fio(workload: Workload, uri: str, runtime_s: int, ramp_s: int, scratch: Path) -> Measurement:
    output = scratch / f"fio-{os.getpid()}-{workload.name}.json"
    output.unlink(missing_ok=True)
    argv = fio_argv(workload, uri, runtime_s, ramp_s, output)
    started = time.perf_counter()
    # subprocess.run kills fio by pid on timeout and on any exception (Ctrl-C included).
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=runtime_s + ramp_s + 60,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise ClientError(f"fio exited {done.returncode}: {_tail(done.stderr + done.stdout)}")
    try:
        text = output.read_text()
    except OSError as exc:
        raise ClientError(f"fio wrote no output file: {exc}; {_tail(done.stderr + done.stdout)}") from exc
    finally:
        output.unlink(missing_ok=True)
    value, details = parse_fio_json(text, workload)
    return Measurement(value=value, commands=[argv], wall_s=wall, details=details)


def nbdcopy_argv(workload: Workload, uri: str, source: Path | None) -> list[str]:
    if workload.direction == "read":
        return ["nbdcopy", "--no-extents", uri, "null:"]
    if source is None:
        raise ClientError("nbdcopy-write needs a source file")
    return ["nbdcopy", "--no-extents", str(source), uri]


def run_nbdcopy(
    workload: Workload, uri: str, source: Path | None, image_bytes: int, min_seconds: float
) -> Measurement:
    """Copy the whole image as many times as fit in min_seconds (at least once); GB/s overall."""
    argv = nbdcopy_argv(workload, uri, source)
    passes: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False
        )
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise ClientError(f"nbdcopy exited {done.returncode}: {_tail(done.stderr + done.stdout)}")
        passes.append(elapsed)
        total = time.perf_counter() - started
        if total >= min_seconds or len(passes) >= _MAX_NBDCOPY_PASSES:
            break
    copied = image_bytes * len(passes)
    busy = sum(passes)
    details: dict[str, Any] = {
        "passes": len(passes),
        "pass_seconds": [round(p, 4) for p in passes],
        "bytes_per_pass": image_bytes,
        "bytes_total": copied,
        "bw_bytes_per_s": copied / busy,
    }
    return Measurement(
        value=copied / busy / 1e9, commands=[argv], wall_s=time.perf_counter() - started, details=details
    )
