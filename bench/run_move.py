"""Benchmark storage moves in one run: `hikkoshi nbd move` against QEMU's own drive-mirror.

    flock /tmp/hikkoshi-bench.lock .venv/bin/python -m bench.run_move [--repeat N] [--size 1G] ...

Peers, each moving the same image (a sparse file, by default 1 GiB with 3/4 of it random data) served
as an NBD export `disk` on 127.0.0.1, to a new file in the same directory:

- hikkoshi-mirror, hikkoshi-dbt: `hikkoshi nbd serve IMAGE --export disk --control unix:SOCK`, then
  `hikkoshi nbd move --control unix:SOCK --to NEW --json --mode mirror|dbt`;
- qemu-background, qemu-write-blocking: `qemu-storage-daemon` serving the image (file + raw node,
  NBD export, QMP monitor), then over QMP `blockdev-add` of a pre-created sparse target and
  `blockdev-mirror sync=full copy-mode=background|write-blocking`, `job-complete` at BLOCK_JOB_READY.

Loads: idle, and fio's nbd engine writing 4 KiB at random (iodepth 8, rate-limited so that every peer
gets the same load) to the export for the whole move, then for a few seconds on the moved disk as a
baseline. A fresh copy of the image and a fresh server for every move; peers interleaved and their order
rotated. Results (machine facts, commands, raw numbers) go to bench/results/move-<UTC timestamp>.json and
a markdown table with the ratios ours/QEMU is printed. Exit status 0 whatever the numbers say (130 when
interrupted, with partial results written; 2 for bad arguments or missing tools).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fio_jobs import ClientError
from bench.move_jobs import (
    EXPORT,
    MIB,
    STRIDE,
    MoveOutcome,
    QsdDaemon,
    allocated_bytes,
    clat_window,
    copy_sparse,
    make_template,
    ours_argv,
    ours_move_argv,
    qsd_argv,
    remove_files,
    remove_fio_logs,
    run_ours_move,
    run_qemu_mirror,
)
from bench.nbd_servers import tool_version
from bench.options import name_list
from bench.proxy_jobs import BackgroundFio, Daemon, JobError, fio_argv, run_fio, sha256_file
from bench.run_nbd import (
    DEFAULT_HIKKOSHI,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_WORKDIR,
    REPO_ROOT,
    _command_output,
    _raise_interrupt,
    log,
    machine_facts,
    parse_size,
    write_results,
)

OURS_MIRROR = "hikkoshi-mirror"
OURS_DBT = "hikkoshi-dbt"
QEMU_BACKGROUND = "qemu-background"
QEMU_BLOCKING = "qemu-write-blocking"
PEERS: tuple[str, ...] = (OURS_MIRROR, OURS_DBT, QEMU_BACKGROUND, QEMU_BLOCKING)
OURS: tuple[str, ...] = (OURS_MIRROR, OURS_DBT)
QEMU: tuple[str, ...] = (QEMU_BACKGROUND, QEMU_BLOCKING)
MODE = {
    OURS_MIRROR: "mirror",
    OURS_DBT: "dbt",
    QEMU_BACKGROUND: "background",
    QEMU_BLOCKING: "write-blocking",
}
ALIASES = {"ours": OURS, "hikkoshi": OURS, "qemu": QEMU}
LOADS: tuple[str, ...] = ("idle", "load")
FLOOR = 0.8  # the issue: our copy throughput >= 0.8 x QEMU's drive-mirror
PAUSE_S = 0.5


def _peers(text: str) -> list[str]:
    return name_list(text, PEERS, "peer", ALIASES)


def _loads(text: str) -> list[str]:
    return name_list(text, LOADS, "load")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run_move",
        description="Benchmark storage moves: hikkoshi nbd move against QEMU's blockdev-mirror.",
    )
    p.add_argument("--repeat", type=int, default=2, help="moves per peer and load (default 2)")
    p.add_argument(
        "--size", type=parse_size, default=1 << 30, help="image size, a multiple of 16M (default 1G)"
    )
    p.add_argument(
        "--allocated", type=float, default=0.75, help="share of the image that is data (default 0.75)"
    )
    p.add_argument(
        "--peers", type=_peers, default=list(PEERS), help=f"subset of {','.join(PEERS)} (or ours, qemu)"
    )
    p.add_argument("--loads", type=_loads, default=list(LOADS), help="idle,load (default both)")
    p.add_argument("--rate", default="20m", help="fio's write rate under load (fio syntax; default 20m)")
    p.add_argument("--iodepth", type=int, default=8, help="fio iodepth under load (default 8)")
    p.add_argument(
        "--baseline", type=int, default=5, help="seconds of the same fio on the moved disk (0: none)"
    )
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds between starting fio and the move (default 1)"
    )
    p.add_argument("--move-timeout", type=float, default=600.0, help="give up on a move after this (s)")
    p.add_argument(
        "--no-verify", action="store_true", help="skip comparing idle moves' result with the image"
    )
    p.add_argument("--keep-images", action="store_true", help="keep the template image in the work dir")
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR / "move",
        help=f"images and logs (default {DEFAULT_WORKDIR / 'move'})",
    )
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where the JSON result goes")
    p.add_argument(
        "--hikkoshi", type=Path, default=DEFAULT_HIKKOSHI, help="our CLI (default .venv/bin/hikkoshi)"
    )
    p.add_argument("--qsd", default="qemu-storage-daemon", help="QEMU's storage daemon")
    return p


@dataclass(frozen=True)
class Settings:
    peers: list[str]
    loads: list[str]
    repeat: int
    size: int
    allocated: float
    rate: str
    iodepth: int
    baseline_s: int
    settle_s: float
    move_timeout_s: float
    verify: bool
    keep_images: bool
    workdir: Path
    output_dir: Path
    hikkoshi: Path
    qsd: str

    def as_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def settings_from_args(argv: Sequence[str] | None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.iodepth < 1 or args.baseline < 0:
        parser.error("--repeat and --iodepth must be >= 1, --baseline >= 0")
    if args.size % STRIDE:
        parser.error(f"--size must be a multiple of {STRIDE >> 20}M")
    if not 0.0 < args.allocated <= 1.0:
        parser.error("--allocated must be in (0, 1]")
    return Settings(
        peers=args.peers,
        loads=args.loads,
        repeat=args.repeat,
        size=args.size,
        allocated=args.allocated,
        rate=args.rate,
        iodepth=args.iodepth,
        baseline_s=args.baseline,
        settle_s=args.settle,
        move_timeout_s=args.move_timeout,
        verify=not args.no_verify,
        keep_images=args.keep_images,
        workdir=Path(args.workdir).resolve(),
        output_dir=Path(args.output_dir).resolve(),
        hikkoshi=Path(args.hikkoshi).absolute(),
        qsd=args.qsd,
    )


def tool_versions() -> dict[str, Any]:
    rev = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    status = _command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"])
    return {
        "fio": tool_version(("fio", "--version")),
        "nbdinfo": tool_version(("nbdinfo", "--version")),
        "qemu-storage-daemon": tool_version(("qemu-storage-daemon", "--version")),
        "hikkoshi": {"git_rev": rev, "src_dirty": bool(status) if status is not None else None},
    }


# --- the run --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, settings: Settings, stamp: str) -> None:
        self.s = settings
        self.stamp = stamp
        self.dir = settings.workdir
        self.logs = settings.workdir / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.template = self.dir / f"template-{settings.size}.raw"
        self.template_sha: str | None = None
        self.allocated = 0
        self.runs: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.commands: dict[str, list[str]] = {}

    def log_path(self, name: str) -> Path:
        return self.logs / f"move-{self.stamp}-{name}.log"

    def prepare(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.allocated = make_template(self.template, self.s.size, self.s.allocated)
        info: dict[str, Any] = {
            "size": self.s.size,
            "allocated_bytes": self.allocated,
            "layout": f"in every {STRIDE >> 20} MiB, the first {self.s.allocated:.0%} random data, "
            "then a hole",
            "create_s": round(time.perf_counter() - t0, 2),
        }
        if self.s.verify:
            self.template_sha = sha256_file(self.template)
            info["sha256"] = self.template_sha
        return info

    def fio_argv(
        self, uri: str, output: Path, runtime_s: int, ramp_s: int, lat_log: Path | None = None
    ) -> list[str]:
        argv = fio_argv(
            "guest-writes", uri, "randwrite", "4k", self.s.iodepth, output, runtime_s=runtime_s, ramp_s=ramp_s
        )
        argv.append(f"--rate={self.s.rate}")
        if lat_log is not None:
            argv += [f"--write_lat_log={lat_log}", "--log_unix_epoch=1"]
        return argv

    def plan(self) -> list[tuple[int, str, str]]:
        out: list[tuple[int, str, str]] = []
        peers = self.s.peers
        for repeat in range(self.s.repeat):
            for li, load in enumerate(self.s.loads):
                shift = (repeat * len(self.s.loads) + li) % len(peers)
                for peer in peers[shift:] + peers[:shift]:
                    out.append((repeat, load, peer))
        return out

    def run_all(self) -> None:
        plan = self.plan()
        for i, (repeat, load, peer) in enumerate(plan, 1):
            head = f"[{i}/{len(plan)}] {peer:<19} {load:<4} repeat {repeat + 1}/{self.s.repeat}:"
            try:
                rec = self.run_one(peer, load, repeat)
            except (JobError, ClientError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
                message = f"{type(exc).__name__}: {exc}"
                self.errors.append({"peer": peer, "load": load, "repeat": repeat, "error": message})
                log(f"{head} ERROR {message}")
            else:
                self.runs.append(rec)
                text = (
                    f"{head} {rec['seconds']:.2f} s, {rec['mib_s']:.0f} MiB/s, "
                    f"CPU {rec['server_cpu_pct']:.0f}%"
                )
                during = rec.get("fio_during")
                if during:
                    text += (
                        f"; writes {during['iops']:.0f} IOPS, clat p50 {during['clat_p50_us']:.0f} µs "
                        f"p99 {during['clat_p99_us']:.0f} µs"
                    )
                log(text)
            time.sleep(PAUSE_S)

    def run_one(self, peer: str, load: str, repeat: int) -> dict[str, Any]:
        image = self.dir / f"image-{peer}.raw"
        dest = self.dir / f"dest-{peer}.raw"
        control = self.dir / f"ctl-{peer}.sock"
        fio_out = self.dir / f"fio-{peer}.json"
        lat_log = self.dir / f"fio-{peer}"
        remove_files(image, dest, control, fio_out)
        remove_fio_logs(lat_log)
        try:
            copy_s = copy_sparse(self.template, image)
            server: Daemon
            if peer in OURS:
                server = Daemon("hikkoshi", ours_argv(self.s.hikkoshi, image, control), self.log_path(peer))
            else:
                server = QsdDaemon(self.s.qsd, image, control, self.log_path(peer))
            rec: dict[str, Any] = {
                "peer": peer,
                "load": load,
                "repeat": repeat,
                "copy_image_s": round(copy_s, 2),
            }
            with server:
                server.start()
                self.commands.setdefault(f"{peer} server", server.argv)
                uri = server.uri(EXPORT)
                with contextlib.ExitStack() as stack:
                    fio: BackgroundFio | None = None
                    if load == "load":
                        argv = self.fio_argv(uri, fio_out, runtime_s=3600, ramp_s=0, lat_log=lat_log)
                        self.commands.setdefault("fio during the move", argv)
                        fio = stack.enter_context(BackgroundFio(argv, fio_out, ("write",)))
                        time.sleep(self.s.settle_s)
                        if fio.proc is None or fio.proc.poll() is not None:
                            raise ClientError("fio ended before the move started")
                    rec["loadavg_1m"] = os.getloadavg()[0]
                    cpu0 = server.cpu_seconds()
                    outcome = self.move(peer, control, dest)
                    cpu1 = server.cpu_seconds()
                    if fio is not None:
                        rec["fio_whole_run"] = fio.stop()["write"]
                        rec["fio_during"] = clat_window(lat_log, *outcome.window)
                if load == "load" and self.s.baseline_s > 0:
                    argv = self.fio_argv(uri, fio_out, runtime_s=self.s.baseline_s, ramp_s=1)
                    self.commands.setdefault("fio after the move (baseline)", argv)
                    rec["fio_after"] = run_fio(argv, fio_out, ("write",), self.s.baseline_s + 60)["write"]
                server.check_alive()
            rec.update(
                seconds=round(outcome.seconds, 4),
                wall_s=round(outcome.wall_s, 4),
                mib_s=round(self.allocated / MIB / outcome.seconds, 1),
                server_cpu_s=round(cpu1 - cpu0, 3),
                server_cpu_pct=round((cpu1 - cpu0) / outcome.wall_s * 100, 1),
                dest_allocated_bytes=allocated_bytes(dest),
                source_left=image.exists(),
                **outcome.details,
            )
            if self.s.verify and load == "idle" and repeat == 0:
                ok = sha256_file(dest) == self.template_sha
                self.checks.append({"check": f"{peer} idle: new file equals the image", "ok": ok})
                log(f"  check {peer}: new file {'equals' if ok else 'DIFFERS FROM'} the image")
            return rec
        finally:
            remove_files(image, dest, control, fio_out)
            remove_fio_logs(lat_log)

    def move(self, peer: str, control: Path, dest: Path) -> MoveOutcome:
        if peer in OURS:
            argv = ours_move_argv(self.s.hikkoshi, control, dest, MODE[peer])
            self.commands.setdefault(f"{peer} move", argv)
            return run_ours_move(argv, control, self.s.move_timeout_s)
        self.commands.setdefault(
            f"{peer} move",
            [
                "QMP:",
                "blockdev-add",
                f"driver=file,filename={dest},node-name=tfile",
                "blockdev-add",
                "driver=raw,file=tfile,node-name=target",
                "blockdev-mirror",
                f"job-id=move0,device=disk,target=target,sync=full,copy-mode={MODE[peer]}",
                "job-complete (at BLOCK_JOB_READY)",
            ],
        )
        return run_qemu_mirror(control, dest, self.s.size, MODE[peer], self.s.move_timeout_s)


# --- summary and report ---------------------------------------------------------------------------------


def _dig(record: dict[str, Any], key: str) -> float | None:
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return float(value) if isinstance(value, int | float) else None


def _values(runs: list[dict[str, Any]], peer: str, load: str, key: str) -> list[float]:
    out = []
    for r in runs:
        if r["peer"] == peer and r["load"] == load:
            v = _dig(r, key)
            if v is not None:
                out.append(v)
    return out


_SUMMARY_KEYS = {
    "seconds": "seconds",
    "wall_s": "wall_s",
    "mib_s": "mib_s",
    "server_cpu_pct": "server_cpu_pct",
    "during_iops": "fio_during.iops",
    "during_p50_us": "fio_during.clat_p50_us",
    "during_p99_us": "fio_during.clat_p99_us",
    "after_iops": "fio_after.iops",
    "after_p50_us": "fio_after.clat_p50_us",
    "after_p99_us": "fio_after.clat_p99_us",
    "hold_ms": "status.hold_ms",
    "passes": "passes",
    "first_pass_s": "first_pass_s",
}


def summarize(runs: list[dict[str, Any]], peers: list[str], loads: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for peer in peers:
        for load in loads:
            entry: dict[str, Any] = {}
            for name, key in _SUMMARY_KEYS.items():
                if name == "passes":
                    vals = [
                        float(len(r["status"]["passes"])) for r in runs if _match(r, peer, load, "status")
                    ]
                elif name == "first_pass_s":
                    vals = [
                        float(r["status"]["passes"][0]["seconds"])
                        for r in runs
                        if _match(r, peer, load, "status") and r["status"]["passes"]
                    ]
                else:
                    vals = _values(runs, peer, load, key)
                if vals:
                    entry[name] = {
                        "median": round(statistics.median(vals), 3),
                        "min": round(min(vals), 3),
                        "max": round(max(vals), 3),
                        "n": len(vals),
                    }
            if peer in OURS:
                entry["fallbacks"] = sum(
                    1 for r in runs if _match(r, peer, load, "status") and r["status"]["fallback_to_mirror"]
                )
            summary[f"{peer}/{load}"] = entry
    return summary


def _match(r: dict[str, Any], peer: str, load: str, key: str) -> bool:
    return bool(r["peer"] == peer and r["load"] == load and key in r)


def _median(summary: dict[str, Any], peer: str, load: str, key: str) -> float | None:
    cell = summary.get(f"{peer}/{load}", {}).get(key)
    return None if cell is None else float(cell["median"])


def ratios(summary: dict[str, Any], peers: list[str], loads: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ours in (p for p in peers if p in OURS):
        for qemu in (p for p in peers if p in QEMU):
            for load in loads:
                a = _median(summary, ours, load, "mib_s")
                b = _median(summary, qemu, load, "mib_s")
                if a is None or b is None or b <= 0:
                    continue
                r = a / b
                out.append(
                    {
                        "ours": ours,
                        "qemu": qemu,
                        "load": load,
                        "throughput_ratio": round(r, 3),
                        "floor": FLOOR,
                        "status": "PASS" if r >= FLOOR else "FAIL",
                    }
                )
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _cell(summary: dict[str, Any], peer: str, load: str, key: str, digits: int = 1) -> str:
    cell = summary.get(f"{peer}/{load}", {}).get(key)
    if cell is None:
        return "—"
    text = _fmt(cell["median"], digits)
    if cell["n"] > 1 and cell["max"] > cell["min"]:
        text += f" ({_fmt(cell['min'], digits)}..{_fmt(cell['max'], digits)})"
    return text


def markdown_report(b: Bench, summary: dict[str, Any], rats: list[dict[str, Any]]) -> str:
    s = b.s
    lines = [
        f"Storage move, {b.stamp}: {s.size / (1 << 30):g} GiB image, {b.allocated / MIB:.0f} MiB of it "
        f"random data; load = fio randwrite 4 KiB, iodepth {s.iodepth}, --rate={s.rate}, during the "
        f"whole move. {s.repeat} repeat(s), median (min..max).",
        "",
        "| peer | idle: s | idle: MiB/s | load: s | load: MiB/s | server CPU % idle / load "
        "| writes during: IOPS | clat p50 / p99 during, µs | after the move: IOPS, p50 / p99 µs |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for peer in s.peers:
        cpu = f"{_fmt(_median(summary, peer, 'idle', 'server_cpu_pct'), 0)} / "
        cpu += _fmt(_median(summary, peer, "load", "server_cpu_pct"), 0)
        p50 = _median(summary, peer, "load", "during_p50_us")
        p99 = _median(summary, peer, "load", "during_p99_us")
        a_iops = _median(summary, peer, "load", "after_iops")
        a50 = _median(summary, peer, "load", "after_p50_us")
        a99 = _median(summary, peer, "load", "after_p99_us")
        lines.append(
            "| "
            + " | ".join(
                [
                    peer,
                    _cell(summary, peer, "idle", "seconds", 2),
                    _cell(summary, peer, "idle", "mib_s", 0),
                    _cell(summary, peer, "load", "seconds", 2),
                    _cell(summary, peer, "load", "mib_s", 0),
                    cpu,
                    _fmt(_median(summary, peer, "load", "during_iops"), 0),
                    f"{_fmt(p50, 0)} / {_fmt(p99, 0)}",
                    f"{_fmt(a_iops, 0)}, {_fmt(a50, 0)} / {_fmt(a99, 0)}",
                ]
            )
            + " |"
        )
    lines.append("")
    ours = [p for p in s.peers if p in OURS]
    if ours and rats:
        head = ["ours / QEMU, copy throughput"]
        cols: list[tuple[str, str]] = []
        for qemu in (p for p in s.peers if p in QEMU):
            for load in s.loads:
                head.append(f"vs {qemu}, {load}")
                cols.append((qemu, load))
        lines += ["| " + " | ".join(head) + " |", "|---|" + "--:|" * len(cols)]
        for peer in ours:
            cells = [peer]
            for qemu, load in cols:
                hit = next(
                    (r for r in rats if r["ours"] == peer and r["qemu"] == qemu and r["load"] == load), None
                )
                cells.append("—" if hit is None else f"{hit['throughput_ratio']:.2f} {hit['status']}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Floor: ours ≥ {FLOOR}x QEMU's drive-mirror copy throughput.", ""]
    notes = []
    for peer in ours:
        for load in s.loads:
            hold = _median(summary, peer, load, "hold_ms")
            passes = _median(summary, peer, load, "passes")
            first = _median(summary, peer, load, "first_pass_s")
            wall = _median(summary, peer, load, "wall_s")
            fallbacks = summary.get(f"{peer}/{load}", {}).get("fallbacks", 0)
            if hold is not None:
                notes.append(
                    f"{peer} {load}: {_fmt(passes, 0)} pass(es), the first in {_fmt(first, 2)} s, "
                    f"writes held {_fmt(hold, 1)} ms, "
                    f"CLI start to exit {_fmt(wall, 2)} s, {fallbacks} fallback(s) to mirror"
                )
    if notes:
        lines += ["Ours, medians: " + "; ".join(notes) + ".", ""]
    if b.checks:
        lines += [
            "Checks: " + "; ".join(f"{c['check']}: {'ok' if c['ok'] else 'FAILED'}" for c in b.checks) + ".",
            "",
        ]
    if b.errors:
        lines += ["Errors:", ""]
        lines += [f"- {e['peer']} {e['load']} r{e['repeat'] + 1}: {e['error']}" for e in b.errors]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    needed = ["fio", "nbdinfo"]
    if any(p in QEMU for p in settings.peers):
        needed.append(settings.qsd)
    for tool in needed:
        if shutil.which(tool) is None:
            log(f"{tool} is not on PATH")
            return 2
    bench = Bench(settings, stamp)
    results: dict[str, Any] = {
        "schema": 1,
        "kind": "storage-move",
        "started_utc": now.isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.run_move", *(sys.argv[1:] if argv is None else argv)],
        "settings": settings.as_json(),
        "machine": machine_facts(settings.workdir),
        "tools": tool_versions(),
        "notes": {
            "seconds": "ours: the server's own `elapsed` of the move (from the move request, which creates "
            "the new file, to done, including the switch and deleting the source); QEMU: from creating the "
            "target file (then blockdev-add, blockdev-mirror) to BLOCK_JOB_COMPLETED",
            "wall_s": "ours: from starting `hikkoshi nbd move` to its exit (Python start-up, 0.2 s polls)",
            "mib_s": "allocated bytes of the image (st_blocks of the template) / seconds",
            "fio_during": "fio (per-write clat log, Unix-ms stamps) started `settle_s` before the move and "
            "stopped (SIGINT) after it; only writes completed inside the job's window (ours: server start "
            "of the move to start + elapsed; QEMU: target creation to BLOCK_JOB_COMPLETED) are counted. "
            "fio_whole_run is fio's own JSON for its whole run",
            "fio_after": "the same fio, time-based, on the moved disk, same server",
            "server_cpu_pct": "user+system CPU of the server's process tree during the move / wall_s",
            "page_cache": "every image copy is fsync'd, then served from the page cache by both servers",
            "qemu_target": "a sparse file of the image's size, blockdev-add'ed as file + raw; QEMU does not "
            "know it reads as zeroes, so it zero-fills the holes of the source on it (see dest bytes)",
        },
        "interrupted": False,
    }
    interrupted = False
    started = time.perf_counter()
    try:
        log(f"making the template image {bench.template} ...")
        results["image"] = bench.prepare()
        log(f"  {bench.allocated / MIB:.0f} MiB allocated of {settings.size / MIB:.0f} MiB")
        results["qsd_command_template"] = qsd_argv(
            settings.qsd, Path("IMAGE"), 0, settings.workdir / "ctl-PEER.sock"
        )
        bench.run_all()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: processes stopped; writing partial results")
    finally:
        if not settings.keep_images:
            bench.template.unlink(missing_ok=True)
    summary = summarize(bench.runs, settings.peers, settings.loads)
    rats = ratios(summary, settings.peers, settings.loads)
    report = markdown_report(bench, summary, rats)
    results.update(
        interrupted=interrupted,
        finished_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        wall_s=round(time.perf_counter() - started, 1),
        commands=bench.commands,
        runs=bench.runs,
        errors=bench.errors,
        checks=bench.checks,
        summary=summary,
        ratios=rats,
        markdown=report,
    )
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path = write_results(results, settings.output_dir, stamp, "move")
    print(report)
    print(f"results: {path}")
    for name, cmd in bench.commands.items():
        print(f"command ({name}): {shlex.join(cmd)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
