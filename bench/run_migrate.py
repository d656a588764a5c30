"""Benchmark live migration in one run: `hikkoshi migrate` against QEMU's own migration done libvirt's way.

    flock /tmp/hikkoshi-bench.lock .venv/bin/python -m bench.run_migrate [--quick] [--repeat N] \
        [--only loopback,wan]

The same guest for everyone: the test guest (`hikkoshi.guest.guest_image.build_guest()`), a VM of 256 MiB and
one vCPU with one 64 MiB disk (thin), booted into ``idle`` or ``busy`` (the disk writer, which verifies
every record it writes, plus memdirty rewriting a tmpfs working set). Each migration boots a fresh VM,
waits for the workload's READY lines (and ``--settle`` seconds), migrates it, lets a busy guest go on on
the destination, stops it with the power button there and reads its verdict.

Cases:

- ours-shared, ours-precopy, ours-postcopy, ours-hybrid: two datastores are two "hosts", the VM starts on
  A through its supervisor, then ``hikkoshi migrate VM --datastore A --to-datastore B --to-runtime-dir DIR
  --storage MODE --json`` (plus ``--wan RTT,RATE`` across the WAN emulator); the figures are the record's
  report;
- qemu-background, qemu-write-blocking, qemu-shared: bench.migrate_peer, QEMU started directly with the
  same command line (disk as a plain raw file, or an NBD export of qemu-storage-daemon for shared),
  NBD export on the destination + ``blockdev-mirror`` + ``migrate`` + ``block-job-cancel`` + ``cont``.

Sections: ``loopback`` (every case, idle and busy, ``--repeat`` times, cases interleaved and their order
rotated) and ``wan`` (every case but the shared ones through one emulated path, ``--wan``, default
150 ms RTT and 100 Mbit/s; ``--wan-repeat`` times). Results (machine facts, exact commands, every
record) go to bench/results/migrate-<UTC timestamp>.json and a markdown report with the floors and the
ratios ours/QEMU is printed. ``--pin-src`` runs hikkoshi from ``git archive HEAD src`` rather than the
working tree, which other engineers may change during the run. Exit status 0 whatever the numbers say
(130 when interrupted, with partial results written; 2 for bad arguments or missing tools).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.migrate_peer import (
    SHARED,
    PeerCase,
    PeerRun,
    check_guest,
    progress_lines,
    qsd_argv,
    read_text,
    ready_tags,
)
from bench.nbd_servers import tool_version
from bench.options import name_list
from bench.run_nbd import (
    DEFAULT_HIKKOSHI,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_WORKDIR,
    REPO_ROOT,
    _command_output,
    _raise_interrupt,
    log,
    machine_facts,
    write_results,
)
from hikkoshi.cli.migrate import parse_wan
from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.guest_image import GuestImage, build_guest
from hikkoshi.guest.guest_vm import create_guest_vm
from hikkoshi.identity.authority import issue_host, make_ca
from hikkoshi.identity.credentials import HostCredentials
from hikkoshi.lab.link_model import WanParams
from hikkoshi.vm.accel import choose_accel
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.procs import alive

SECTIONS: tuple[str, ...] = ("loopback", "wan")
WORKLOADS: tuple[str, ...] = ("idle", "busy")
OURS_MODES: tuple[str, ...] = ("shared", "precopy", "postcopy", "hybrid")
QEMU_MODES: tuple[str, ...] = ("background", "write-blocking", "shared")
WAN_OURS_MODES: tuple[str, ...] = ("precopy", "postcopy", "hybrid")  # `--wan` refuses shared storage
WAN_QEMU_MODES: tuple[str, ...] = ("background", "write-blocking")
#: ``ours-tls``: ours with every stream between the hosts over TLS (``--tls-dir``), to measure its cost.
OURS_PEERS: tuple[str, ...] = ("ours", "ours-tls")
PEERS: tuple[str, ...] = (*OURS_PEERS, "qemu")
VM_NAME = "mig"
MEMORY_MIB = 256
DISK_MIB = 64
BOOT_TIMEOUT = 120.0
DOWNTIME_FLOOR_MS = 50.0  # loopback, idle guest, every mode of ours: QEMU's downtime p50 at most this
WAN_SLACK_S = 2.0  # postcopy/hybrid on the WAN: on the destination within memory bytes / rate + this
PAUSE_S = 0.5
MIB = 1 << 20


def case_name(peer: str, mode: str) -> str:
    return f"{peer}-{mode}"


def _sections(text: str) -> list[str]:
    return name_list(text, SECTIONS, "section")


def _workloads(text: str) -> list[str]:
    return name_list(text, WORKLOADS, "workload")


def _peers(text: str) -> list[str]:
    if not text.strip(" ,"):
        return ["ours", "qemu"]  # nothing named: both
    return name_list(text, PEERS, "peer")


def _cases(text: str) -> list[str]:
    known = {case_name(p, m) for p in OURS_PEERS for m in OURS_MODES}
    known |= {case_name("qemu", m) for m in QEMU_MODES}
    return name_list(text, sorted(known), "case")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run_migrate",
        description="Benchmark live migration: hikkoshi migrate against QEMU's own (libvirt's way).",
    )
    p.add_argument("--repeat", type=int, default=3, help="loopback migrations per case and workload (3)")
    p.add_argument("--wan-repeat", type=int, default=1, help="WAN migrations per case and workload (1)")
    p.add_argument("--only", type=_sections, default=list(SECTIONS), help="loopback,wan (default both)")
    p.add_argument("--workloads", type=_workloads, default=list(WORKLOADS), help="idle,busy (both)")
    p.add_argument(
        "--wan-workloads", type=_workloads, default=list(WORKLOADS), help="workloads across the WAN (both)"
    )
    p.add_argument(
        "--peers",
        type=_peers,
        default=["ours", "qemu"],
        help="ours,ours-tls,qemu (default ours,qemu; ours-tls: ours with TLS on every stream)",
    )
    p.add_argument("--cases", type=_cases, help="only these cases, e.g. ours-hybrid,qemu-background")
    p.add_argument("--quick", action="store_true", help="1 repeat, loopback, idle guest only")
    p.add_argument("--wan", default="150ms,100Mbit", help="RTT,RATE of the emulated WAN (150ms,100Mbit)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds between READY and the migration (1)")
    p.add_argument("--dirty-rate", type=int, default=4, help="busy: memdirty MiB/s (4)")
    p.add_argument("--dirty-mb", type=int, default=32, help="busy: memdirty working set MiB (32)")
    p.add_argument(
        "--pin-src",
        action="store_true",
        help="run our code from `git archive HEAD src` (not the working tree, which may change meanwhile)",
    )
    p.add_argument(
        "--no-keep-failed",
        action="store_true",
        help="delete the directory of a failed case too (default: kept in the work dir for a look)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="give up on one migration after this (s)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR / "migrate",
        help=f"datastores, images and logs (default {DEFAULT_WORKDIR / 'migrate'})",
    )
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where the JSON result goes")
    p.add_argument("--hikkoshi", type=Path, default=DEFAULT_HIKKOSHI, help="our CLI (.venv/bin/hikkoshi)")
    p.add_argument("--qsd", default="qemu-storage-daemon", help="QEMU's storage daemon (qemu-shared)")
    return p


@dataclass(frozen=True)
class Settings:
    sections: list[str]
    repeat: int
    wan_repeat: int
    workloads: list[str]
    wan_workloads: list[str]
    peers: list[str]
    cases: list[str] | None
    quick: bool
    wan: str
    settle_s: float
    dirty_rate: int
    dirty_mb: int
    timeout_s: float
    keep_failed: bool
    pin_src: bool
    workdir: Path
    output_dir: Path
    hikkoshi: Path
    qsd: str

    def as_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def settings_from_args(argv: Sequence[str] | None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.wan_repeat < 1 or args.dirty_rate < 1 or args.dirty_mb < 1:
        parser.error("--repeat, --wan-repeat, --dirty-rate and --dirty-mb must be >= 1")
    try:
        wan = parse_wan(args.wan)
    except ValueError as exc:
        parser.error(str(exc))
    if wan.rate_bps is None:
        parser.error("--wan needs a rate (RTT,RATE) for the WAN floor")
    sections, repeat, workloads = args.only, args.repeat, args.workloads
    if args.quick:
        sections, repeat, workloads = ["loopback"], 1, ["idle"]
    return Settings(
        sections=sections,
        repeat=repeat,
        wan_repeat=args.wan_repeat,
        workloads=workloads,
        wan_workloads=args.wan_workloads,
        peers=args.peers,
        cases=args.cases,
        quick=args.quick,
        wan=args.wan,
        settle_s=args.settle,
        dirty_rate=args.dirty_rate,
        dirty_mb=args.dirty_mb,
        timeout_s=args.timeout,
        keep_failed=not args.no_keep_failed,
        pin_src=args.pin_src,
        workdir=Path(args.workdir).resolve(),
        output_dir=Path(args.output_dir).resolve(),
        hikkoshi=Path(args.hikkoshi).absolute(),
        qsd=args.qsd,
    )


PIN_ENV = "HIKKOSHI_BENCH_PINNED_SRC"


def src_root() -> Path:
    """Where our code comes from in this run: a pinned snapshot (``--pin-src``) or the working tree."""
    pinned = os.environ.get(PIN_ENV)
    return Path(pinned) if pinned else REPO_ROOT / "src"


def src_fingerprint() -> dict[str, Any]:
    """What our code was: HEAD, uncommitted changes under src/ and a hash of every file of the code in use
    (without --pin-src other engineers may change the working tree during a run, and each process uses what
    is on disk when it starts)."""
    root = src_root()
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return {
        "code": str(root),
        "git_rev": _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]),
        "uncommitted_in_src": _command_output(
            ["git", "-C", str(REPO_ROOT), "diff", "--stat", "HEAD", "--", "src"]
        ),
        "src_sha256": digest.hexdigest(),
    }


def pin_src(workdir: Path, stamp: str, argv: list[str]) -> None:
    """Re-run this runner with ``git archive HEAD src`` extracted under the work dir first on PYTHONPATH, so
    that it, the CLI, the supervisors and every service they start use one committed version of our code."""
    target = workdir / f"src-{stamp}"
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", "HEAD", "src"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True, timeout=60)
    env = dict(os.environ)
    env[PIN_ENV] = str(target / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target / "src"), env.get("PYTHONPATH")) if p)
    log(f"pinned our code to HEAD ({_command_output(['git', '-C', str(REPO_ROOT), 'rev-parse', 'HEAD'])})")
    os.execve(sys.executable, [sys.executable, "-m", "bench.run_migrate", *argv], env)


def tool_versions(guest: GuestImage) -> dict[str, Any]:
    rev = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    status = _command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"])
    return {
        "qemu-system-x86_64": tool_version(("qemu-system-x86_64", "--version")),
        "qemu-storage-daemon": tool_version(("qemu-storage-daemon", "--version")),
        "guest_kernel": guest.kernel_release,
        "guest_key": guest.key,
        "hikkoshi": {"git_rev": rev, "src_dirty": bool(status) if status is not None else None},
    }


# --- processes ---------------------------------------------------------------------------------------------


class CaseError(RuntimeError):
    """One migration did not complete."""


def reap(pids: list[int], timeout: float = 20.0) -> list[int]:
    """Wait until none of ``pids`` lives, SIGKILL (by pid) those that still do; the ones killed."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = [p for p in pids if alive(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed


def wait_ready(home: VmHome, needles: list[str], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        text = read_text(home.console_log)
        if all(n in text for n in needles):
            return time.monotonic()
        if not home.is_running():
            raise CaseError(f"the VM stopped before {needles}: {text[-500:]}")
        if time.monotonic() > deadline:
            raise CaseError(f"no {needles} within {timeout:.0f} s: {text[-500:]}")
        time.sleep(0.05)


def stop_home(home: VmHome, hard: bool) -> dict[str, Any]:
    """Stop a VM through its supervisor (power button unless ``hard``); kill it if that fails."""
    try:
        return asyncio.run(control.stop_vm(home, home.load_spec(), grace=60.0, hard=hard))
    except Exception as exc:
        if home.is_running():
            control.kill_vm(home)
        return {"exit": {"how": f"killed after: {exc}"}}


# --- the run -----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, settings: Settings, stamp: str, guest: GuestImage) -> None:
        self.s = settings
        self.stamp = stamp
        self.guest = guest
        self.accel = choose_accel("auto")
        self.wan_params: WanParams = parse_wan(settings.wan)
        self.dir = settings.workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runs: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.commands: dict[str, list[str]] = {}
        self.qmp: dict[str, dict[str, list[str]]] = {}
        self.kept: list[str] = []
        self.index = 0

    # --- plan

    def cases(self, section: str) -> list[tuple[str, str]]:
        ours = WAN_OURS_MODES if section == "wan" else OURS_MODES
        qemu = WAN_QEMU_MODES if section == "wan" else QEMU_MODES
        out: list[tuple[str, str]] = []
        for peer in OURS_PEERS:
            if peer in self.s.peers:
                out += [(peer, m) for m in ours]
        if "qemu" in self.s.peers:
            out += [("qemu", m) for m in qemu]
        if self.s.cases is not None:
            out = [c for c in out if case_name(*c) in self.s.cases]
        return out

    def plan(self) -> list[tuple[str, int, str, str, str]]:
        """(section, repeat, workload, peer, mode), cases interleaved and their order rotated."""
        out: list[tuple[str, int, str, str, str]] = []
        for section in self.s.sections:
            cases = self.cases(section)
            if not cases:
                continue
            repeats = self.s.wan_repeat if section == "wan" else self.s.repeat
            workloads = self.s.wan_workloads if section == "wan" else self.s.workloads
            for rep in range(repeats):
                for wi, workload in enumerate(workloads):
                    shift = (rep * len(workloads) + wi) % len(cases)
                    for peer, mode in cases[shift:] + cases[:shift]:
                        out.append((section, rep, workload, peer, mode))
        return out

    def run_all(self) -> None:
        plan = self.plan()
        for i, (section, rep, workload, peer, mode) in enumerate(plan, 1):
            case = case_name(peer, mode)
            repeats = self.s.wan_repeat if section == "wan" else self.s.repeat
            head = f"[{i}/{len(plan)}] {section:<8} {case:<20} {workload:<4} repeat {rep + 1}/{repeats}:"
            base: dict[str, Any] = {
                "section": section,
                "case": case,
                "peer": peer,
                "mode": mode,
                "workload": workload,
            }
            base |= {"repeat": rep, "loadavg_1m": round(os.getloadavg()[0], 2)}
            t0 = time.monotonic()
            try:
                if peer in OURS_PEERS:
                    rec = self.run_ours(section, mode, workload, tls=peer == "ours-tls")
                else:
                    rec = self.run_qemu(section, mode, workload)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                self.errors.append({**base, "error": message[:4000]})
                log(f"{head} ERROR {message[:600]}")
            else:
                rec = {**base, **rec, "case_wall_s": round(time.monotonic() - t0, 1)}
                self.runs.append(rec)
                log(f"{head} {_line(rec)}")
            time.sleep(PAUSE_S)

    # --- the guest

    def guest_params(self, workload: str) -> tuple[int | None, dict[str, str | int]]:
        if workload != "busy":
            return None, {}
        run = random.randrange(1, 2**31)
        params: dict[str, str | int] = {"run": run, "progress": 4, "scrub": 16}
        params |= {"rate": self.s.dirty_rate, "mb": self.s.dirty_mb}
        return run, params

    def new_vm(self, store: Datastore, workload: str, params: dict[str, str | int]) -> VmHome:
        data = {
            "name": VM_NAME,
            "memory_mib": MEMORY_MIB,
            "disks": [{"name": "disk0", "size": f"{DISK_MIB}M"}],
            "nics": [],
        }
        return create_guest_vm(store, self.guest, data, workload, params)

    def case_dir(self) -> Path:
        self.index += 1
        path = self.dir / f"case-{self.stamp}-{self.index}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # --- ours

    def tls_dir(self) -> Path:
        """QEMU's x509 files for ``ours-tls``: a cluster CA and one host certificate (for 127.0.0.1, both
        "hosts" being this machine), made as ``hikkoshi cluster init/issue`` make them, once a run."""
        directory = self.dir / f"tls-{self.stamp}"
        if not (directory / "qemu" / "ca-cert.pem").exists():
            make_ca(directory / "ca")
            issued = issue_host(directory / "ca", "bench", directory / "host", ["127.0.0.1"])
            HostCredentials.load(issued.cert, issued.key, issued.ca).qemu_dir(directory / "qemu")
        return directory / "qemu"

    def run_ours(self, section: str, mode: str, workload: str, *, tls: bool = False) -> dict[str, Any]:
        work = self.case_dir()
        runtime_b = Path(tempfile.mkdtemp(prefix="hkmb-", dir="/tmp"))
        a, b = Datastore.init(work / "a"), Datastore.init(work / "b")
        run, params = self.guest_params(workload)
        home = self.new_vm(a, workload, params)
        dest = b.home(VM_NAME)
        pids: list[int] = []
        rec: dict[str, Any] = {}
        keep = True  # unless the case ends well: its directory is kept for a look
        try:
            boot0 = time.monotonic()
            info = control.start_vm(home, timeout=BOOT_TIMEOUT)
            pids += [int(info[k]) for k in ("supervisor_pid", "qemu_pid", "nbd_pid") if info.get(k)]
            rec["boot_to_ready_s"] = round(wait_ready(home, ready_tags(workload), BOOT_TIMEOUT) - boot0, 3)
            time.sleep(self.s.settle_s)
            argv = [str(self.s.hikkoshi), "migrate", VM_NAME, "--datastore", str(a.path)]
            argv += ["--to-datastore", str(b.path), "--to-runtime-dir", str(runtime_b)]
            argv += ["--storage", mode, "--json"]
            if section == "wan":
                argv += ["--wan", self.s.wan]
            if tls:
                argv += ["--tls-dir", str(self.tls_dir())]
            self.commands.setdefault(f"ours{'-tls' if tls else ''} {mode} ({section})", argv)
            t0 = time.monotonic()
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.s.timeout_s
            )
            rec["cli_wall_s"] = round(time.monotonic() - t0, 3)
            if dest.path.exists():
                pids += dest.recorded_pids()
            try:
                record = json.loads(done.stdout)
            except ValueError:
                raise CaseError(
                    f"no JSON record (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-1500:]}"
                ) from None
            report = record.get("report") or {}
            if done.returncode != 0 or record.get("phase") != "done":
                raise CaseError(
                    f"exit {done.returncode}, phase {record.get('phase')}: {record.get('error')}; "
                    f"{done.stderr[-800:]}"
                )
            sw = report.get("switchover") or {}
            # QEMU announces 'completed' before it has filled in total-time and downtime; a query-migrate
            # in between (the coordinator asks right after the event) reads zeros: no figure, not 0 ms.
            raced = not report.get("total_time_ms")
            memory_s = (report.get("total_time_ms") or 0) / 1000
            rec.update(
                encrypted=report.get("encrypted"),
                memory_mib_s=round(report["memory_bytes"] / MIB / memory_s, 1)
                if memory_s and report.get("memory_bytes")
                else None,
                downtime_ms=None if raced else report.get("downtime_ms"),
                downtime_unset=raced,
                gap_ms=sw.get("gap_ms"),
                storage_ms=sw.get("storage_ms"),
                to_destination_s=report.get("time_to_destination_s"),
                total_s=report.get("elapsed_s"),
                memory_bytes=report.get("memory_bytes"),
                memory_iterations=report.get("memory_iterations"),
                source_released_s=report.get("source_released_s"),
                migration_id=record.get("id"),
                routes=(record.get("facts") or {}).get("routes"),
                report=report,
            )
            if workload == "busy":
                deadline = time.monotonic() + 60
                while progress_lines(read_text(dest.console_log)) < 2 and time.monotonic() < deadline:
                    if not dest.is_running():
                        break
                    time.sleep(0.2)
                rec["progress_lines_on_destination"] = progress_lines(read_text(dest.console_log))
            state = stop_home(dest, hard=False)
            rec["stop"] = (state.get("exit") or {}).get("how")
            image = (home if mode == SHARED else dest).path / "disk0.raw"
            rec["check"] = check_guest(read_text(dest.console_log), workload, run, image)
            keep = not rec["check"]["ok"]
            return rec
        finally:
            for h in (dest, home):
                if h.path.exists():
                    pids += h.recorded_pids()
                    if h.is_running():
                        stop_home(h, hard=True)
            killed = reap(sorted(set(pids)))
            if killed:
                log(f"  killed leftover processes {killed}")
            self.done_with(work, keep)
            shutil.rmtree(runtime_b, ignore_errors=True)

    # --- QEMU, libvirt's way

    def done_with(self, work: Path, keep: bool) -> None:
        if keep and self.s.keep_failed:
            self.kept.append(str(work))
            log(f"  kept {work} for a look")
        else:
            shutil.rmtree(work, ignore_errors=True)

    def run_qemu(self, section: str, mode: str, workload: str) -> dict[str, Any]:
        work = self.case_dir()
        keep = True
        try:
            a = Datastore.init(work / "a")
            run, params = self.guest_params(workload)
            home = self.new_vm(a, workload, params)
            case = PeerCase(
                storage=mode,
                spec=home.load_spec(),
                home=home,
                accel=self.accel,
                work=work,
                workload=workload,
                run=run,
                settle_s=self.s.settle_s,
                wan=self.wan_params if section == "wan" else None,
                qsd=self.s.qsd,
            )
            peer = PeerRun(case)
            try:
                rec = peer.run(self.s.timeout_s)
            finally:
                for name, argv in peer.commands.items():
                    self.commands.setdefault(f"qemu {mode} ({section}): {name}", argv)
            self.qmp.setdefault(f"qemu {mode} ({section})", rec.pop("qmp"))
            keep = not rec["check"]["ok"]
            return rec
        finally:
            self.done_with(work, keep)


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _line(rec: dict[str, Any]) -> str:
    mem = rec.get("memory_bytes")
    check = rec.get("check") or {}
    return (
        f"downtime {_fmt(_num(rec.get('downtime_ms')), 0)} ms, gap {_fmt(_num(rec.get('gap_ms')), 0)} ms, "
        f"on the destination after {_fmt(_num(rec.get('to_destination_s')), 2)} s, "
        f"total {_fmt(_num(rec.get('total_s')), 2)} s, "
        f"memory {_fmt(None if mem is None else mem / MIB, 1)} MiB; "
        f"check {'ok' if check.get('ok') else 'FAILED'} ({check.get('detail', '')[:160]})"
    )


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


# --- summary and report ------------------------------------------------------------------------------------

_METRICS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "downtime_ms": lambda r: _num(r.get("downtime_ms")),
    "gap_ms": lambda r: _num(r.get("gap_ms")),
    "to_destination_s": lambda r: _num(r.get("to_destination_s")),
    "total_s": lambda r: _num(r.get("total_s")),
    "memory_mib": lambda r: None if _num(r.get("memory_bytes")) is None else r["memory_bytes"] / MIB,
    "memory_mib_s": lambda r: _num(r.get("memory_mib_s")),
    "storage_ms": lambda r: _num(r.get("storage_ms")),
    "mirror_cancel_ms": lambda r: _num(r.get("mirror_cancel_ms")),
    "cli_wall_s": lambda r: _num(r.get("cli_wall_s")),
}


def _key(section: str, workload: str, case: str) -> str:
    return f"{section}/{workload}/{case}"


def summarize(b: Bench) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for section in b.s.sections:
        workloads = b.s.wan_workloads if section == "wan" else b.s.workloads
        for workload in workloads:
            for peer, mode in b.cases(section):
                case = case_name(peer, mode)
                runs = [
                    r for r in b.runs if (r["section"], r["workload"], r["case"]) == (section, workload, case)
                ]
                entry: dict[str, Any] = {
                    "runs": len(runs),
                    "errors": sum(
                        1
                        for e in b.errors
                        if (e["section"], e["workload"], e["case"]) == (section, workload, case)
                    ),
                    "checks_ok": sum(1 for r in runs if (r.get("check") or {}).get("ok")),
                    "downtime_unset": sum(1 for r in runs if r.get("downtime_unset")),
                }
                for name, get in _METRICS.items():
                    vals = [v for v in (get(r) for r in runs) if v is not None]
                    if vals:
                        entry[name] = {
                            "median": round(statistics.median(vals), 3),
                            "min": round(min(vals), 3),
                            "max": round(max(vals), 3),
                            "n": len(vals),
                            "values": [round(v, 3) for v in vals],
                        }
                summary[_key(section, workload, case)] = entry
    return summary


def _median(summary: dict[str, Any], key: str, metric: str) -> float | None:
    cell = summary.get(key, {}).get(metric)
    return None if cell is None else float(cell["median"])


def floors(b: Bench, summary: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if "loopback" in b.s.sections and "idle" in b.s.workloads and "ours" in b.s.peers:
        for mode in OURS_MODES:
            p50 = _median(summary, _key("loopback", "idle", case_name("ours", mode)), "downtime_ms")
            out.append(
                {
                    "floor": f"loopback, idle guest, ours-{mode}: downtime p50 <= {DOWNTIME_FLOOR_MS:g} ms",
                    "value": p50,
                    "status": "n/a" if p50 is None else "PASS" if p50 <= DOWNTIME_FLOOR_MS else "FAIL",
                }
            )
    if "wan" in b.s.sections and "ours" in b.s.peers:
        rate = b.wan_params.rate_bps or 1.0
        for workload in b.s.wan_workloads:
            for mode in ("postcopy", "hybrid"):
                runs = [
                    r
                    for r in b.runs
                    if (r["section"], r["workload"], r["case"]) == ("wan", workload, case_name("ours", mode))
                    and _num(r.get("to_destination_s")) is not None
                    and _num(r.get("memory_bytes")) is not None
                ]
                checks = [
                    {
                        "to_destination_s": r["to_destination_s"],
                        "ideal_s": round(r["memory_bytes"] * 8 / rate + WAN_SLACK_S, 3),
                    }
                    for r in runs
                ]
                ok = bool(checks) and all(c["to_destination_s"] <= c["ideal_s"] for c in checks)
                out.append(
                    {
                        "floor": f"WAN {b.s.wan}, {workload} guest, ours-{mode}: on the destination within "
                        f"memory bytes x 8 / rate + {WAN_SLACK_S:g} s",
                        "value": checks,
                        "status": "n/a" if not checks else "PASS" if ok else "FAIL",
                    }
                )
    return out


def _pairs(section: str) -> list[tuple[str, str]]:
    """(ours case, QEMU case) compared: shared with shared, the disk-moving modes with both mirrors."""
    qemu = WAN_QEMU_MODES if section == "wan" else QEMU_MODES
    ours = WAN_OURS_MODES if section == "wan" else OURS_MODES
    out: list[tuple[str, str]] = []
    for mode in ours:
        for q in qemu:
            if (mode == SHARED) == (q == SHARED):
                out.append((case_name("ours", mode), case_name("qemu", q)))
    return out


_RATIO_METRICS = ("downtime_ms", "gap_ms", "to_destination_s", "total_s")


def ratios(b: Bench, summary: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not {"ours", "qemu"} <= set(b.s.peers):
        return out
    for section in b.s.sections:
        workloads = b.s.wan_workloads if section == "wan" else b.s.workloads
        for workload in workloads:
            for ours, qemu in _pairs(section):
                row: dict[str, Any] = {"section": section, "workload": workload, "ours": ours, "qemu": qemu}
                for metric in _RATIO_METRICS:
                    a = _median(summary, _key(section, workload, ours), metric)
                    q = _median(summary, _key(section, workload, qemu), metric)
                    row[metric] = round(a / q, 3) if a is not None and q else None
                out.append(row)
    return out


_TLS_METRICS = ("downtime_ms", "memory_mib_s", "to_destination_s", "total_s")


def tls_costs(b: Bench, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each mode run both ways: the medians in plain TCP and over TLS, and TLS / plain."""
    out: list[dict[str, Any]] = []
    if not set(OURS_PEERS) <= set(b.s.peers):
        return out
    for section in b.s.sections:
        workloads = b.s.wan_workloads if section == "wan" else b.s.workloads
        for workload in workloads:
            for peer, mode in b.cases(section):
                if peer != "ours":
                    continue
                row: dict[str, Any] = {"section": section, "workload": workload, "mode": mode}
                for metric in _TLS_METRICS:
                    plain = _median(summary, _key(section, workload, case_name("ours", mode)), metric)
                    tls = _median(summary, _key(section, workload, case_name("ours-tls", mode)), metric)
                    row[metric] = {
                        "plain": plain,
                        "tls": tls,
                        "ratio": round(tls / plain, 3) if tls is not None and plain else None,
                    }
                out.append(row)
    return out


def _cell(summary: dict[str, Any], key: str, metric: str, digits: int = 1) -> str:
    cell = summary.get(key, {}).get(metric)
    if cell is None:
        return "—"
    text = _fmt(cell["median"], digits)
    if cell["n"] > 1 and cell["max"] > cell["min"]:
        text += f" ({_fmt(cell['min'], digits)}..{_fmt(cell['max'], digits)})"
    return text


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown_report(
    b: Bench,
    summary: dict[str, Any],
    rats: list[dict[str, Any]],
    fl: list[dict[str, Any]],
    tls: list[dict[str, Any]] | None = None,
) -> str:
    s = b.s
    lines = [
        f"Live migration, {b.stamp}: test guest, {MEMORY_MIB} MiB, 1 vCPU, one {DISK_MIB} MiB thin disk, "
        f"accel {b.accel}; busy = diskwriter (progress 4, scrub 16) + memdirty {s.dirty_rate} MiB/s over "
        f"{s.dirty_mb} MiB. Median (min..max) of {s.repeat} on loopback, {s.wan_repeat} across the WAN "
        f"({s.wan}). downtime = QEMU's (query-migrate); gap = guest stopped on the source to running on the "
        "destination (ours: the coordinator's clock, from pre-switchover seen to resumed; QEMU: its STOP and "
        "RESUME event timestamps); total = until the source is no longer needed (ours: the record's elapsed, "
        "disk post-copy included; QEMU: source QEMU quit). [n unset]: QEMU had not filled in its downtime "
        "yet when the coordinator asked (the record says 0 ms); left out.",
        "",
    ]
    for section in s.sections:
        workloads = s.wan_workloads if section == "wan" else s.workloads
        for workload in workloads:
            title = "loopback" if section == "loopback" else f"across the WAN ({s.wan})"
            lines += [
                f"#### {title}, {workload} guest",
                "",
                "| case | downtime (ms) | gap (ms) | on destination (s) | total (s) | memory sent (MiB) "
                "| guest check |",
                "|---|--:|--:|--:|--:|--:|---|",
            ]
            for peer, mode in b.cases(section):
                case = case_name(peer, mode)
                key = _key(section, workload, case)
                entry = summary.get(key, {})
                checks = f"{entry.get('checks_ok', 0)}/{entry.get('runs', 0)} ok"
                if entry.get("errors"):
                    checks += f", {entry['errors']} failed migration(s)"
                lines.append(
                    "| "
                    + " | ".join(
                        [
                            case,
                            _cell(summary, key, "downtime_ms", 0)
                            + (f" [{entry['downtime_unset']} unset]" if entry.get("downtime_unset") else ""),
                            _cell(summary, key, "gap_ms", 0),
                            _cell(summary, key, "to_destination_s", 2),
                            _cell(summary, key, "total_s", 2),
                            _cell(summary, key, "memory_mib", 1),
                            checks,
                        ]
                    )
                    + " |"
                )
            lines.append("")
            rows = [r for r in rats if r["section"] == section and r["workload"] == workload]
            if rows:
                lines += [
                    "| ours / QEMU | downtime | gap | on destination | total |",
                    "|---|--:|--:|--:|--:|",
                ]
                for r in rows:
                    lines.append(
                        f"| {r['ours']} / {r['qemu']} | {_ratio(r['downtime_ms'])} | {_ratio(r['gap_ms'])} "
                        f"| {_ratio(r['to_destination_s'])} | {_ratio(r['total_s'])} |"
                    )
                lines.append("")
    if tls:
        lines += [
            "TLS cost (medians, plain TCP → TLS, and TLS / plain): memory throughput = memory bytes sent / "
            "QEMU's total migration time.",
            "",
            "| section, guest, mode | downtime (ms) | memory (MiB/s) | on destination (s) | total (s) |",
            "|---|--:|--:|--:|--:|",
        ]
        for r in tls:
            cells = []
            for metric, digits in zip(_TLS_METRICS, (0, 1, 2, 2), strict=True):
                c = r[metric]
                cells.append(f"{_fmt(c['plain'], digits)} → {_fmt(c['tls'], digits)} ({_ratio(c['ratio'])})")
            lines.append(f"| {r['section']}, {r['workload']}, {r['mode']} | " + " | ".join(cells) + " |")
        lines.append("")
    if fl:
        lines += ["Floors:", ""]
        for f in fl:
            value = f["value"]
            if isinstance(value, list):
                shown = ", ".join(f"{v['to_destination_s']:.2f} s vs {v['ideal_s']:.2f} s" for v in value)
            else:
                shown = "—" if value is None else f"{value:g} ms"
            lines.append(f"- {f['floor']}: {shown} → **{f['status']}**")
        lines.append("")
    bad = [r for r in b.runs if not (r.get("check") or {}).get("ok")]
    if bad:
        lines += ["Guest checks that failed:", ""]
        for r in bad:
            detail = (r.get("check") or {}).get("detail", "no check")
            lines.append(f"- {r['section']} {r['case']} {r['workload']} r{r['repeat'] + 1}: {detail[:300]}")
        lines.append("")
    if b.errors:
        lines += ["Failed migrations:", ""]
        for e in b.errors:
            lines.append(
                f"- {e['section']} {e['case']} {e['workload']} r{e['repeat'] + 1}: {e['error'][:400]}"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    settings = settings_from_args(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    if settings.pin_src and PIN_ENV not in os.environ:
        pin_src(settings.workdir, stamp, args)
    needed = ["qemu-system-x86_64"]
    if "qemu" in settings.peers and "loopback" in settings.sections:
        needed.append(settings.qsd)
    for tool in needed:
        if shutil.which(tool) is None:
            log(f"{tool} is not on PATH")
            return 2
    # Host A's sockets go to a short directory of this run (host B's: one per migration).
    runtime_a = Path(tempfile.mkdtemp(prefix="hkma-", dir="/tmp"))
    os.environ["HIKKOSHI_RUNTIME_DIR"] = str(runtime_a)
    guest = build_guest()
    bench = Bench(settings, stamp, guest)
    results: dict[str, Any] = {
        "schema": 1,
        "kind": "live-migration",
        "started_utc": now.isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.run_migrate", *args],
        "settings": settings.as_json(),
        "machine": machine_facts(settings.workdir),
        "tools": tool_versions(guest),
        "src_at_start": src_fingerprint(),
        "guest": {"memory_mib": MEMORY_MIB, "cpus": 1, "disk_mib": DISK_MIB, "accel": bench.accel},
        "notes": {
            "downtime_ms": "QEMU's own figure (query-migrate 'downtime' on the source). Ours runs with "
            "pause-before-switchover, so it includes the storage step at the switchover; QEMU's way cancels "
            "the mirror and resumes the destination after QEMU's migration completed, so its figure leaves "
            "out the mirror's last copy and the cont",
            "gap_ms": "ours: the coordinator's (pre-switchover observed to the destination resumed); QEMU's "
            "way: the source's STOP event to the destination's RESUME event (QEMU's timestamps)",
            "to_destination_s": "ours: the record's time_to_destination_s (from the coordinator's start: "
            "prechecks, destination supervisor and QEMU start, storage, memory, switchover, resume); QEMU's "
            "way: from spawning the destination QEMU to `cont` answered",
            "total_s": "ours: the record's elapsed_s (disk post-copy and source release included); QEMU's "
            "way: until the source QEMU quit after the switchover",
            "qemu_way": "the VM's own QEMU command line (hikkoshi.vm.qemu.qemu_command) with a raw file as "
            "the disk's protocol node; destination -S -incoming defer; nbd-server-start + block-export-add; "
            "source blockdev-add nbd + blockdev-mirror sync=full; downtime-limit 300 ms, "
            "max-bandwidth 1 TiB/s (ours: first 50 ms, raised in steps up to 300 on stalls); migrate; "
            "block-job-cancel; nbd-server-stop; cont; quit on the source",
            "wan": "ours: `hikkoshi migrate --wan RTT,RATE` (stream, mirror and export through one WanPath); "
            "QEMU's way: the migration stream and the mirror's NBD connection through relays of one WanPath "
            "(clients at site A). Shared storage is left out there: `--wan` refuses it",
        },
        "interrupted": False,
    }
    interrupted = False
    started = time.perf_counter()
    try:
        if "qemu" in settings.peers:
            results["qsd_command_template"] = qsd_argv(settings.qsd, Path("IMAGE"), Path("SOCKET"), "disk0")
        bench.run_all()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: processes stopped; writing partial results")
    finally:
        shutil.rmtree(runtime_a, ignore_errors=True)
    summary = summarize(bench)
    rats = ratios(bench, summary)
    fl = floors(bench, summary)
    costs = tls_costs(bench, summary)
    report = markdown_report(bench, summary, rats, fl, costs)
    results.update(
        interrupted=interrupted,
        finished_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        wall_s=round(time.perf_counter() - started, 1),
        commands=bench.commands,
        qmp=bench.qmp,
        runs=bench.runs,
        errors=bench.errors,
        summary=summary,
        ratios=rats,
        floors=fl,
        tls_costs=costs,
        kept_case_dirs=bench.kept,
        markdown=report,
    )
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["src_at_end"] = src_fingerprint()
    if PIN_ENV in os.environ:
        shutil.rmtree(Path(os.environ[PIN_ENV]).parent, ignore_errors=True)
    if results["src_at_end"]["src_sha256"] != results["src_at_start"]["src_sha256"]:
        log("note: src/ changed during the run (see src_at_start and src_at_end in the result file)")
    path = write_results(results, settings.output_dir, stamp, "migrate")
    print(report)
    print(f"results: {path}")
    for name, cmd in bench.commands.items():
        print(f"command ({name}): {shlex.join(cmd)}")
    for name, sent in bench.qmp.items():
        for side, cmds in sent.items():
            print(f"QMP ({name}, {side}): {'; '.join(cmds)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
