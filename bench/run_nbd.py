"""Compare NBD servers' data plane in one run: ours, nbdkit (file plugin) and qemu-nbd.

    .venv/bin/python -m bench.run_nbd [--quick] [--servers nbdkit,qemu-nbd] [--repeat N] ...

Every server serves the same raw image from the same machine in the same run; (server, workload)
pairs are interleaved and repeated, and the median is reported. Results (machine facts, exact
commands, raw numbers) go to bench/results/nbd-<UTC timestamp>.json and a markdown table with
ratios and the issue's floors is printed. The exit status is 0 whatever the numbers say: this is
a measurement, not a test (130 when interrupted, 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from bench.fio_jobs import (
    WORKLOADS,
    WORKLOADS_BY_NAME,
    ClientError,
    Measurement,
    Workload,
    run_fio,
    run_nbdcopy,
)
from bench.nbd_servers import (
    ALL_SERVERS,
    NBDKIT,
    OURS,
    QEMU_NBD,
    RunningServer,
    ServerError,
    ServerSpec,
    content_check,
    server_specs,
    tool_version,
    unavailable_reason,
)
from bench.options import name_list

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/var/tmp/hikkoshi-bench")
DEFAULT_OUTPUT_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_HIKKOSHI = REPO_ROOT / ".venv" / "bin" / "hikkoshi"

SERVER_ALIASES = {"ours": OURS, "qemu": QEMU_NBD}

# The floors: (workload, peer) such that ours must be at least as fast as the peer.
FLOORS: tuple[tuple[str, str], ...] = (
    ("randread-4k", QEMU_NBD),
    ("randwrite-4k", QEMU_NBD),
    ("seqread-1m", NBDKIT),
)

_CHUNK = 8 << 20
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M, 1073741824)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2).upper()]
    size = int(match.group(1)) << shift
    if size < (1 << 20):
        raise argparse.ArgumentTypeError("image must be at least 1 MiB")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_nbd",
        description="Benchmark NBD servers (ours, nbdkit, qemu-nbd) on the same image in one run.",
    )
    parser.add_argument(
        "--servers",
        type=lambda s: name_list(s, ALL_SERVERS, "server", SERVER_ALIASES),
        default=list(ALL_SERVERS),
        help=f"comma-separated subset of {','.join(ALL_SERVERS)} (aliases: ours, qemu); default all",
    )
    parser.add_argument(
        "--workloads",
        type=lambda s: name_list(s, [w.name for w in WORKLOADS], "workload"),
        default=[w.name for w in WORKLOADS],
        help=f"comma-separated subset of {','.join(w.name for w in WORKLOADS)}; default all",
    )
    parser.add_argument(
        "--runtime", type=int, default=None, help="seconds per run (default 10; 3 with --quick)"
    )
    parser.add_argument(
        "--ramp", type=int, default=None, help="fio ramp_time seconds (default 1; 0 with --quick)"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per (server, workload) (default 2; 1 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s runs, no ramp, one repeat")
    parser.add_argument("--image-size", type=parse_size, default=1 << 30, help="raw image size (default 1G)")
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"image and logs (default {DEFAULT_WORKDIR})"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where the JSON result goes"
    )
    parser.add_argument(
        "--hikkoshi", type=Path, default=DEFAULT_HIKKOSHI, help="our CLI (default .venv/bin/hikkoshi)"
    )
    parser.add_argument(
        "--no-content-check",
        action="store_true",
        help="skip reading the whole image over NBD once per server and comparing it with the file",
    )
    return parser


@dataclass(frozen=True)
class Settings:
    servers: list[str]
    workloads: list[Workload]
    runtime_s: int
    ramp_s: int
    repeat: int
    quick: bool
    image_size: int
    workdir: Path
    output_dir: Path
    hikkoshi: Path
    content_check: bool


def settings_from_args(argv: Sequence[str] | None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    runtime = args.runtime if args.runtime is not None else (3 if args.quick else 10)
    ramp = args.ramp if args.ramp is not None else (0 if args.quick else 1)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 2)
    if runtime < 1 or ramp < 0 or repeat < 1:
        parser.error("--runtime and --repeat must be >= 1, --ramp >= 0")
    return Settings(
        servers=list(args.servers),
        workloads=[WORKLOADS_BY_NAME[name] for name in args.workloads],
        runtime_s=runtime,
        ramp_s=ramp,
        repeat=repeat,
        quick=bool(args.quick),
        image_size=int(args.image_size),
        workdir=Path(args.workdir).resolve(),
        output_dir=Path(args.output_dir).resolve(),
        hikkoshi=Path(args.hikkoshi).absolute(),
        content_check=not args.no_content_check,
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the image ------------------------------------------------------------------------------


def _looks_filled(path: Path, size: int) -> bool:
    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            f.seek(size - len(head))
            tail = f.read(1 << 20)
    except OSError:
        return False
    return head.count(0) < len(head) // 2 and tail.count(0) < len(tail) // 2


def ensure_filled_file(path: Path, size: int) -> bool:
    """Create `path` with `size` bytes of random data unless it is already there; True if created."""
    if _looks_filled(path, size):
        return False
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            left = size
            while left:
                n = min(left, _CHUNK)
                f.write(os.urandom(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def warm_page_cache(path: Path) -> float:
    """Read the file once so that no server pays for cold reads; seconds taken."""
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(_CHUNK):
            pass
    return time.perf_counter() - started


def flush_file(path: Path) -> None:
    """Write back what the previous run dirtied, so it does not disturb the next one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- machine facts --------------------------------------------------------------------------


def _read_first(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.platform())
    except OSError:
        return platform.platform()


def _command_output(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_facts(workdir: Path) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _read_first("/proc/cpuinfo", "model name"),
        "mem_total": _read_first("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "workdir_fs": _command_output(["stat", "-f", "-c", "%T", str(workdir)]),
        "loadavg_at_start": list(os.getloadavg()),
    }


def tool_versions(specs: dict[str, ServerSpec]) -> dict[str, Any]:
    versions: dict[str, Any] = {
        "fio": tool_version(("fio", "--version")),
        "nbdcopy": tool_version(("nbdcopy", "--version")),
        "nbdinfo": tool_version(("nbdinfo", "--version")),
        NBDKIT: tool_version(specs[NBDKIT].version_argv),
        QEMU_NBD: tool_version(specs[QEMU_NBD].version_argv),
    }
    rev = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    status = _command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"])
    versions[OURS] = {"git_rev": rev, "src_dirty": bool(status) if status is not None else None}
    return versions


# --- running --------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def run_one(
    spec: ServerSpec,
    workload: Workload,
    settings: Settings,
    image: Path,
    source: Path | None,
    log_path: Path,
    probes: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Start the server, run one workload, stop the server; the run's record (with any error)."""
    record: dict[str, Any] = {"server": spec.name, "workload": workload.name, "unit": workload.unit}
    with RunningServer(spec, image, log_path) as server:
        try:
            server.start()
            record["server_command"] = server.argv
            record["uri"] = server.uri
            if spec.name not in probes:
                # First start of this server in the run: what it advertises, and that it serves the image.
                probes[spec.name] = {"nbdinfo": server.describe()}
                if settings.content_check:
                    probes[spec.name]["content_check"] = content_check(server.uri, image)
            flush_file(image)
            record["loadavg_1m_before"] = os.getloadavg()[0]
            cpu_before = server.cpu_seconds()
            measurement: Measurement
            if workload.tool == "fio":
                measurement = run_fio(
                    workload, server.uri, settings.runtime_s, settings.ramp_s, settings.workdir
                )
            else:
                measurement = run_nbdcopy(
                    workload, server.uri, source, settings.image_size, settings.runtime_s
                )
            server.check_alive()
            cpu = server.cpu_seconds() - cpu_before
            record.update(
                value=measurement.value,
                client_commands=measurement.commands,
                wall_s=round(measurement.wall_s, 3),
                server_cpu_s=round(cpu, 3),
                server_cpu_pct=round(100.0 * cpu / measurement.wall_s, 1) if measurement.wall_s > 0 else None,
                details=measurement.details,
            )
        except (ServerError, ClientError, subprocess.TimeoutExpired, OSError) as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
    record["server_exit_status"] = server.exit_status
    return record


def plan_runs(settings: Settings, servers: list[str]) -> list[tuple[int, Workload, str]]:
    """Every (repeat, workload, server), servers interleaved and their order rotated."""
    plan: list[tuple[int, Workload, str]] = []
    n = len(servers)
    for repeat in range(settings.repeat):
        for index, workload in enumerate(settings.workloads):
            shift = (repeat + index) % n
            order = servers[shift:] + servers[:shift]
            plan.extend((repeat, workload, name) for name in order)
    return plan


# --- reporting ------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], settings: Settings, servers: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for workload in settings.workloads:
        per_server: dict[str, Any] = {}
        for name in servers:
            ok = [r for r in runs if r["workload"] == workload.name and r["server"] == name and "value" in r]
            failed = [
                r for r in runs if r["workload"] == workload.name and r["server"] == name and "error" in r
            ]
            if not ok and not failed:
                continue
            values = [float(r["value"]) for r in ok]
            cpu = [float(r["server_cpu_pct"]) for r in ok if r.get("server_cpu_pct") is not None]
            per_server[name] = {
                "n": len(values),
                "failed": len(failed),
                "median": statistics.median(values) if values else None,
                "min": min(values) if values else None,
                "max": max(values) if values else None,
                "server_cpu_pct_median": statistics.median(cpu) if cpu else None,
            }
        summary[workload.name] = {"unit": workload.unit, "servers": per_server}
    return summary


def _median(summary: dict[str, Any], workload: str, server: str) -> float | None:
    entry = summary.get(workload, {}).get("servers", {}).get(server)
    if entry is None or entry["median"] is None:
        return None
    return float(entry["median"])


def ratio(summary: dict[str, Any], workload: str, server: str, peer: str) -> float | None:
    ours = _median(summary, workload, server)
    theirs = _median(summary, workload, peer)
    if ours is None or theirs is None or theirs <= 0:
        return None
    return ours / theirs


def check_floors(summary: dict[str, Any]) -> list[dict[str, Any]]:
    floors: list[dict[str, Any]] = []
    for workload, peer in FLOORS:
        ours = _median(summary, workload, OURS)
        theirs = _median(summary, workload, peer)
        r = ratio(summary, workload, OURS, peer)
        status = "n/a" if r is None else ("PASS" if r >= 1.0 else "FAIL")
        # With repeats, do the two servers' ranges overlap? Then the verdict is within the noise.
        a = summary.get(workload, {}).get("servers", {}).get(OURS)
        b = summary.get(workload, {}).get("servers", {}).get(peer)
        overlap: bool | None = None
        if r is not None and a is not None and b is not None and a["n"] > 1 and b["n"] > 1:
            overlap = bool(a["max"] >= b["min"] and b["max"] >= a["min"])
        floors.append(
            {
                "floor": f"{OURS} {workload} >= {peer}",
                "workload": workload,
                "peer": peer,
                "ours": ours,
                "peer_value": theirs,
                "ratio": r,
                "status": status,
                "ranges_overlap": overlap,
            }
        )
    return floors


def _fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if unit == "IOPS" else f"{value:.2f}"


def _fmt_cell(entry: dict[str, Any] | None, unit: str) -> str:
    if entry is None:
        return "—"
    if entry["median"] is None:
        return "failed"
    text = _fmt_value(entry["median"], unit)
    if entry["n"] > 1 and entry["median"] > 0:
        spread = (entry["max"] - entry["min"]) / 2 / entry["median"] * 100
        text += f" ±{spread:.0f}%"
    if entry["failed"]:
        text += f" ({entry['failed']} failed)"
    return text


def markdown_report(
    summary: dict[str, Any],
    floors: list[dict[str, Any]],
    settings: Settings,
    servers: list[str],
    stamp: str,
    probes: dict[str, dict[str, Any]],
) -> str:
    peers = [p for p in (QEMU_NBD, NBDKIT) if p in servers] if OURS in servers else []
    header = ["workload", "unit", *servers, *(f"{OURS}/{p}" for p in peers)]
    lines = [
        f"NBD data plane, {stamp}, {os.cpu_count()} CPUs, {settings.image_size >> 20} MiB image, "
        f"{settings.runtime_s} s runs x {settings.repeat} (median, ± half the spread)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---"] + ["--:"] * (len(header) - 2)) + "|",
    ]
    for name, entry in summary.items():
        unit = entry["unit"]
        cells = [name, unit]
        cells += [_fmt_cell(entry["servers"].get(s), unit) for s in servers]
        for peer in peers:
            r = ratio(summary, name, OURS, peer)
            cells.append("—" if r is None else f"{r:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Server CPU, % of one core (median):", ""]
    lines.append("| workload | " + " | ".join(servers) + " |")
    lines.append("|---|" + "|".join(["--:"] * len(servers)) + "|")
    for name, entry in summary.items():
        cells = [name]
        for s in servers:
            cpu = entry["servers"].get(s, {}).get("server_cpu_pct_median")
            cells.append("—" if cpu is None else f"{cpu:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    checks = [(s, probes[s]["content_check"]) for s in servers if "content_check" in probes.get(s, {})]
    if checks:
        verdicts = ", ".join(f"{s} {'ok' if c['ok'] else 'MISMATCH'}" for s, c in checks)
        lines += ["", f"Whole image read over NBD equals the file: {verdicts}"]
    lines += ["", "Floors:", ""]
    for floor in floors:
        r = floor["ratio"]
        detail = "not measured" if r is None else f"ratio {r:.2f}"
        if floor["ranges_overlap"]:
            detail += "; repeats overlap, within the noise"
        lines.append(f"- {floor['floor']}: **{floor['status']}** ({detail})")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], output_dir: Path, stamp: str, kind: str = "nbd") -> Path:
    """Write ``bench/results/KIND-STAMP.json`` atomically (every runner's result file)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{kind}-{stamp}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    specs = server_specs(settings.hikkoshi)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    logs = settings.workdir / "logs"
    logs.mkdir(exist_ok=True)

    skipped: dict[str, str] = {}
    servers: list[str] = []
    for name in settings.servers:
        reason = unavailable_reason(specs[name])
        if reason is None:
            servers.append(name)
        else:
            skipped[name] = reason
            log(f"skipping {name}: {reason}")

    results: dict[str, Any] = {
        "schema": 1,
        "kind": "nbd-data-plane",
        "started_utc": now.isoformat(timespec="seconds"),
        "settings": {
            "servers_requested": settings.servers,
            "servers": servers,
            "workloads": [w.name for w in settings.workloads],
            "runtime_s": settings.runtime_s,
            "fio_ramp_s": settings.ramp_s,
            "repeat": settings.repeat,
            "quick": settings.quick,
            "image_size": settings.image_size,
            "order": "per repeat and workload, servers interleaved; order rotated each time",
            "between_runs": "server restarted for every run; image fsync'd before every run",
        },
        "machine": machine_facts(settings.workdir),
        "tools": tool_versions(specs),
        "servers": {
            name: {
                "command_template": list(specs[name].template),
                "notes": specs[name].notes,
                "log": str(logs / f"{stamp}-{name}.log"),
            }
            for name in servers
        },
        "skipped_servers": skipped,
        "runs": [],
        "interrupted": False,
    }
    runs: list[dict[str, Any]] = results["runs"]
    probes: dict[str, dict[str, Any]] = {}
    interrupted = False
    try:
        if servers:
            image = settings.workdir / f"nbd-image-{settings.image_size}.raw"
            source: Path | None = None
            log(f"image {image} ({settings.image_size} bytes)")
            image_info: dict[str, Any] = {
                "path": str(image),
                "created_this_run": ensure_filled_file(image, settings.image_size),
                "fill": "os.urandom",
            }
            if any(w.tool == "nbdcopy" and w.direction == "write" for w in settings.workloads):
                source = settings.workdir / f"nbd-source-{settings.image_size}.raw"
                image_info["nbdcopy_source"] = str(source)
                ensure_filled_file(source, settings.image_size)
                warm_page_cache(source)
            image_info["warm_read_s"] = round(warm_page_cache(image), 3)
            results["image"] = image_info

            plan = plan_runs(settings, servers)
            for i, (repeat, workload, name) in enumerate(plan, 1):
                spec = specs[name]
                record = run_one(
                    spec, workload, settings, image, source, logs / f"{stamp}-{name}.log", probes
                )
                record["repeat"] = repeat
                runs.append(record)
                head = (
                    f"[{i}/{len(plan)}] {workload.name:<13} {name:<9} repeat {repeat + 1}/{settings.repeat}:"
                )
                if "error" in record:
                    log(f"{head} ERROR {record['error']}")
                else:
                    log(
                        f"{head} {_fmt_value(record['value'], workload.unit)} {workload.unit}, "
                        f"server CPU {record['server_cpu_pct']}%"
                    )
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: servers stopped; writing partial results")

    for name, probe in probes.items():
        results["servers"][name].update(probe)
    summary = summarize(runs, settings, servers)
    floors = check_floors(summary)
    report = markdown_report(summary, floors, settings, servers, stamp, probes)
    results.update(
        interrupted=interrupted,
        finished_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        summary=summary,
        floors=floors,
        markdown=report,
    )
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path = write_results(results, settings.output_dir, stamp)
    print(report)
    for name, reason in skipped.items():
        print(f"(skipped {name}: {reason})")
    print(f"results: {path}")
    for name in servers:
        example = next(
            (r["server_command"] for r in runs if r["server"] == name and "server_command" in r), None
        )
        if example is not None:
            print(f"command ({name}): {shlex.join(example)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
