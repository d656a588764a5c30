"""VM runtime benchmark: guest boot time and guest disk throughput, through our export vs a plain file.

    .venv/bin/python -m bench.run_vm [--repeat N] [--mib M] [--rounds R] [--configs a,b,...] [--quick]

Boots the test guest into the ``ddbench`` workload (sequential ``O_DIRECT`` dd in the guest, see
:mod:`hikkoshi.guest.ddbench`) with the same QEMU command line except for how its disk is attached:

- ``hikkoshi``: our NBD service (``hikkoshi nbd serve``, Unix socket) under QEMU's nbd client, with
  the ``-blockdev``/``-device`` arguments the VM runtime uses;
- ``qemu-nbd``: the peer NBD server on the same socket type, same QEMU arguments;
- ``file``: ``-drive file=IMG,format=raw,if=virtio`` (QEMU opens the file itself);
- ``vm-start``: the whole production path, ``hikkoshi vm start`` as a library call (supervisor, NBD
  service, QEMU with QMP); its boot time counts from the start request.

Boot time runs from starting QEMU (or the start request) to the workload's READY line on the
console; throughput is what the guest's dd reports. Configurations are interleaved and repeated;
medians and ratios to ``file`` are reported. Results go to bench/results/vm-<UTC timestamp>.json.
Every process started here is stopped by pid. Exit status 0 whatever the numbers (a measurement,
not a test); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.nbd_servers import stop_pid
from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.ddbench import TAG, ddbench_results
from hikkoshi.guest.guest_image import GuestImage, build_guest, qemu_command
from hikkoshi.guest.guest_vm import create_guest_vm
from hikkoshi.vm.accel import choose_accel
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.host import host_facts
from hikkoshi.vm.qemu import nbd_disk_args
from hikkoshi.vm.qemu import qemu_command as vm_qemu_command
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.spec import DiskSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "bench" / "results"
CONFIGS = ("hikkoshi", "qemu-nbd", "file", "vm-start")
MEMORY_MIB = 512
RUN_TIMEOUT = 300.0


def log(message: str) -> None:
    print(f"[run_vm] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.run_vm", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="boots per configuration (default 3)")
    p.add_argument(
        "--mib", type=int, default=128, help="MiB the guest writes and reads per round (default 128)"
    )
    p.add_argument("--rounds", type=int, default=3, help="write+read rounds per boot (default 3)")
    p.add_argument("--reads", type=int, default=4, help="times each round reads the data back (default 4)")
    p.add_argument("--bs-kib", type=int, default=1024, help="dd request size in KiB (default 1024)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--quick", action="store_true", help="one boot per configuration, 16 MiB")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new one under /var/tmp)")
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    return p


# --- processes --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def nbd_server(kind: str, image: Path, socket: Path, log_file: Path) -> Iterator[list[str]]:
    """Serve ``image`` as export ``disk0`` on ``socket``; yield the server's command once it listens."""
    if kind == "hikkoshi":
        cmd = [sys.executable, "-m", "hikkoshi", "nbd", "serve", str(image), "--listen", f"unix:{socket}"]
        cmd += ["--export", "disk0"]
    else:
        cmd = ["qemu-nbd", "-f", "raw", "-t", "-x", "disk0", "-k", str(socket), str(image)]
    with log_file.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start: {log_file.read_text(errors='replace')[-1000:]}")
            time.sleep(0.01)
        yield cmd
    finally:
        stop_pid(proc)


def wait_for(console: Path, needle: str, deadline: float, proc: subprocess.Popen[bytes] | None) -> float:
    """Poll the console until ``needle`` appears; the monotonic time it was seen."""
    while True:
        try:
            if needle in console.read_text(errors="replace"):
                return time.monotonic()
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            if needle in console.read_text(errors="replace"):
                return time.monotonic()
            raise RuntimeError(f"QEMU exited before {needle!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {needle!r} within {RUN_TIMEOUT} s")
        time.sleep(0.01)


# --- one run ----------------------------------------------------------------------------------------------


def fresh_image(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)


def run_qemu(
    config: str, guest: GuestImage, accel: str, work: Path, params: dict[str, str | int]
) -> dict[str, Any]:
    """Boot once with the disk attached the ``config`` way; boot time and dd results."""
    image = work / "disk.raw"
    fresh_image(image, (int(params["mib"]) + 16) << 20)
    console = work / "console.log"
    console.unlink(missing_ok=True)
    socket = work / "nbd.sock"
    socket.unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        server_cmd: list[str] | None = None
        if config == "file":
            disk = ["-drive", f"file={image},format=raw,if=virtio"]
        else:
            server_cmd = stack.enter_context(nbd_server(config, image, socket, work / f"{config}.log"))
            disk = nbd_disk_args(DiskSpec(name="disk0", size=image.stat().st_size), socket)
        cmd = qemu_command(
            guest,
            None,
            "ddbench",
            console_log=console,
            params=params,
            memory_mib=MEMORY_MIB,
            accel="kvm" if accel == "kvm" else "tcg",
            extra_args=["-machine", "q35", *disk],
        )
        t0 = time.monotonic()
        with (work / "qemu.log").open("wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = t0 + RUN_TIMEOUT
            ready = wait_for(console, f"{TAG} READY", deadline, proc)
            wait_for(console, f"{TAG} DONE", deadline, proc)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            stop_pid(proc)
    text = console.read_text(errors="replace")
    return {
        "boot_seconds": round(ready - t0, 3),
        "results": [r.__dict__ for r in ddbench_results(text)],
        "qemu_command": cmd,
        "server_command": server_cmd,
    }


def run_vm_start(guest: GuestImage, work: Path, params: dict[str, str | int], index: int) -> dict[str, Any]:
    """The production path: a datastore VM started through its supervisor."""
    store_path = work / "ds"
    store = Datastore.open(store_path) if store_path.exists() else Datastore.init(store_path)
    name = f"bench{index}"
    home = create_guest_vm(
        store,
        guest,
        {
            "name": name,
            "memory_mib": MEMORY_MIB,
            "machine": "q35",
            "disks": [{"name": "disk0", "size": (int(params["mib"]) + 16) << 20}],
            "nics": [],
        },
        "ddbench",
        params,
    )
    try:
        t0 = time.monotonic()
        info = control.start_vm(home, timeout=RUN_TIMEOUT)
        try:
            deadline = t0 + RUN_TIMEOUT
            ready = wait_for(home.console_log, f"{TAG} READY", deadline, None)
            wait_for(home.console_log, f"{TAG} DONE", deadline, None)
            if not control.wait_stopped(home, max(1.0, deadline - time.monotonic())):
                raise RuntimeError("the VM did not power off after ddbench")
        finally:
            if home.is_running():
                asyncio.run(control.stop_vm(home, home.load_spec(), hard=True))
        text = home.console_log.read_text(errors="replace")
        return {
            "boot_seconds": round(ready - t0, 3),
            "results": [r.__dict__ for r in ddbench_results(text)],
            "supervisor": {k: info.get(k) for k in ("accel", "qemu_pid", "nbd_pid")},
            "qemu_command": vm_qemu_command(
                home.load_spec(),
                home,
                RunDir.for_vm(home.load_spec().uuid),
                accel="kvm" if info.get("accel") == "kvm" else "tcg",
            ),
        }
    finally:
        store.destroy_vm(name)


# --- report -----------------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], configs: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for config in configs:
        ok = [r for r in runs if r["config"] == config and "error" not in r]
        writes = [x["mib"] / max(x["write_seconds"], 0.01) for r in ok for x in r["results"]]
        reads = [x["read_mib"] / max(x["read_seconds"], 0.01) for r in ok for x in r["results"]]
        boots = [r["boot_seconds"] for r in ok]
        summary[config] = {
            "runs": len(ok),
            "failed": sum(1 for r in runs if r["config"] == config and "error" in r),
            "boot_seconds_median": round(statistics.median(boots), 3) if boots else None,
            "write_mib_s_median": round(statistics.median(writes), 1) if writes else None,
            "read_mib_s_median": round(statistics.median(reads), 1) if reads else None,
            "boot_seconds": boots,
            "write_mib_s": [round(w, 1) for w in writes],
            "read_mib_s": [round(r, 1) for r in reads],
        }
    return summary


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def markdown(summary: dict[str, Any], settings: dict[str, Any]) -> str:
    base = summary.get("file", {})
    lines = [
        f"Guest: test guest, {MEMORY_MIB} MiB, 1 vCPU, accel {settings['accel']}; dd {settings['mib']} MiB "
        f"in {settings['bs_kib']} KiB O_DIRECT requests (read back {settings['reads']} times), "
        f"{settings['rounds']} rounds per boot, "
        f"{settings['repeat']} boots per configuration (medians; ratio = config / file).",
        "",
        "| disk attached via | boot to READY (s) | ratio | write (MiB/s) | ratio | read (MiB/s) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for config, s in summary.items():
        cells = [config]
        for key in ("boot_seconds_median", "write_mib_s_median", "read_mib_s_median"):
            value = s[key]
            cells += ["-" if value is None else str(value), _ratio(value, base.get(key))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError:
        return None
    return out.splitlines()[0] if out else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown or args.repeat < 1 or args.mib < 1 or args.rounds < 1:
        print(f"bench.run_vm: bad arguments ({', '.join(sorted(unknown)) or 'numbers'})", file=sys.stderr)
        return 2
    if args.quick:
        args.repeat, args.mib, args.rounds = 1, 32, 2
    if "qemu-nbd" in configs and shutil.which("qemu-nbd") is None:
        log("qemu-nbd not installed; skipping it")
        configs.remove("qemu-nbd")
    guest = build_guest()
    accel = choose_accel("auto")
    params: dict[str, str | int] = {
        "mib": args.mib,
        "bs": args.bs_kib,
        "rounds": args.rounds,
        "reads": args.reads,
    }
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hikkoshi-bench-vm-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    # Sockets of vm-start go to a short directory of their own.
    os.environ.setdefault("HIKKOSHI_RUNTIME_DIR", str(work / "run"))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    facts = host_facts()
    settings = {
        "repeat": args.repeat,
        "mib": args.mib,
        "rounds": args.rounds,
        "bs_kib": args.bs_kib,
        "reads": args.reads,
        "configs": configs,
        "accel": accel,
        "memory_mib": MEMORY_MIB,
    }
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(args.repeat):
            for config in configs:  # interleaved, so that slow minutes hit every configuration
                log(f"boot {rep + 1}/{args.repeat}: {config}")
                try:
                    if config == "vm-start":
                        result = run_vm_start(guest, work, params, len(runs))
                    else:
                        result = run_qemu(config, guest, accel, work, params)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    log(f"{config} failed: {exc}")
                    result = {"error": str(exc)}
                runs.append({"config": config, "repeat": rep, **result})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs, configs)
    table = markdown(summary, settings)
    results = {
        "kind": "vm",
        "started": stamp,
        "machine": {
            "hostname": facts.hostname,
            "cpu": facts.cpu.model,
            "cpus": facts.cpu.count,
            "memory_total": facts.memory.total,
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "versions": {
            "qemu": _version(["qemu-system-x86_64", "--version"]),
            "qemu-nbd": _version(["qemu-nbd", "--version"]),
            "guest_kernel": guest.kernel_release,
            "guest_key": guest.key,
        },
        "settings": settings,
        "runs": runs,
        "summary": summary,
        "markdown": table,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"vm-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
