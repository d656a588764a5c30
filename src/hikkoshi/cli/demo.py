"""`hikkoshi demo`: the main job, on one machine with nothing prepared.

Builds the test guest if needed, makes two "hosts" (a datastore and a runtime directory each), boots a
small Linux VM on host A that writes self-checking records to its disk and dirties its memory, live-
migrates it to host B (hybrid storage: the disk follows through the relocation proxy) with the
progress shown, prints the report, lets the guest verify everything it wrote on B, and cleans up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..vm import control
from ..vm.datastore import Datastore
from ..vm.diskwriter import verify_diskwriter_image
from ..vm.guest_image import GuestImageError, build_guest
from ..vm.guest_vm import create_guest_vm
from ..vm.home import VmHome

_DONE = re.compile(r"HIKKOSHI-DISKWRITER DONE run=(\d+) last=(\d+) written=\d+ records=\d+ OK")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the demonstration: a live migration of a real guest")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument(
        "--storage",
        default="hybrid",
        choices=["shared", "precopy", "postcopy", "hybrid"],
        help="storage mode",
    )
    p.add_argument("--wan", metavar="RTT,RATE", help="migrate across an emulated WAN, e.g. 150ms,100Mbit")
    p.set_defaults(func=demo_command)


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _wait_console(home: VmHome, pattern: str, timeout: float = 180.0, after: int = 0) -> re.Match[str]:
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = home.console_log.read_text(errors="replace") if home.console_log.exists() else ""
        m = regex.search(text, after)
        if m:
            return m
        if not home.is_running():
            break
        time.sleep(0.1)
    raise RuntimeError(f"no {pattern!r} on the console of {home.path}")


def _console_len(home: VmHome) -> int:
    return len(home.console_log.read_text(errors="replace")) if home.console_log.exists() else 0


def _stop(home: VmHome) -> dict[str, Any]:
    return asyncio.run(control.stop_vm(home, home.load_spec(), grace=60))


def demo_command(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="hikkoshi-demo-", dir="/var/tmp"))
    runtimes = [Path(tempfile.mkdtemp(prefix="hk-demo-", dir="/tmp")) for _ in "ab"]
    homes: list[VmHome] = []
    try:
        _say("building (or finding) the test guest: a Debian kernel and a busybox initramfs")
        guest = build_guest()
        a, b = Datastore.init(work / "host-a"), Datastore.init(work / "host-b")
        run = random.randrange(1, 2**31)
        params = {"run": run, "progress": 8, "scrub": 32, "rate": 4, "mb": 32}
        spec = {"name": "demo", "memory_mib": 256, "disks": [{"name": "disk0", "size": "64M"}], "nics": []}
        source = create_guest_vm(a, guest, spec, "busy", params)
        dest = b.home("demo")
        homes += [source, dest]
        _say(f"host A: {a.path} (runtime {runtimes[0]}); host B: {b.path} (runtime {runtimes[1]})")
        info = control.start_vm(source, runtime_dir=runtimes[0], timeout=180)
        _say(f"VM 'demo' runs on host A ({info['accel']}): QEMU pid {info['qemu_pid']}, disks served by pid "
             f"{info['nbd_pid']}")  # fmt: skip
        _wait_console(source, rf"HIKKOSHI-DISKWRITER PROGRESS run={run} durable=(1[6-9]|[2-9]\d|\d{{3,}}) ")
        _wait_console(source, r"HIKKOSHI-MEMDIRTY READY")
        _say("the guest writes checked records to its disk and dirties 32 MiB of memory at 4 MiB/s")
        cmd = [sys.executable, "-m", "hikkoshi", "migrate", "demo", "--datastore", str(a.path)]
        cmd += [
            "--to-datastore",
            str(b.path),
            "--to-runtime-dir",
            str(runtimes[1]),
            "--storage",
            args.storage,
        ]
        if args.wan:
            cmd += ["--wan", args.wan]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            _say("FAILED: the migration did not complete (the VM runs on where the report says)")
            return 1
        state = asyncio.run(control.vm_status(dest, dest.load_spec()))
        left = "gone" if not source.path.exists() else "still there (shared storage)"
        _say(f"VM 'demo' now runs on host B: {state.get('state')}, QEMU pid {state.get('qemu_pid')}; "
             f"host A's copy is {left}")  # fmt: skip
        mark = _console_len(dest)
        _wait_console(dest, rf"HIKKOSHI-DISKWRITER PROGRESS run={run} ", after=mark)
        _say("the guest goes on writing on host B; stopping it (ACPI) so it verifies everything it wrote")
        _stop(dest)
        text = dest.console_log.read_text(errors="replace")
        done = _DONE.search(text)
        if done is None:
            _say("FAILED: the guest did not confirm its data")
            return 1
        last = int(done[2])
        disk = dest.path / "disk0.raw" if args.storage != "shared" else source.path / "disk0.raw"
        report = verify_diskwriter_image(disk, run=run, durable=last)
        _say(f"OK: the guest verified its {last + 1} records in memory and on disk, and so did the host "
             f"({report.records} records in {disk.name}, last {report.last})")  # fmt: skip
        return 0
    except (GuestImageError, RuntimeError, OSError, ValueError) as exc:
        _say(f"FAILED: {exc}")
        return 1
    finally:
        for home in homes:
            if home.path.exists() and home.is_running():
                with contextlib.suppress(Exception):
                    control.kill_vm(home)
        for runtime in runtimes:
            shutil.rmtree(runtime, ignore_errors=True)
        if args.keep:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
