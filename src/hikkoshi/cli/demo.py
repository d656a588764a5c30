"""`hikkoshi demo`: the main job, on one machine with nothing prepared.

Builds the test guest if needed, makes a cluster CA and a certificate for each of two "hosts"
(``hikkoshi cluster init`` and ``cluster issue``), starts a local etcd (``hikkoshi cluster up``) and the
two host agents, which join it as a cluster (each with its own datastore and certificate), creates on
host A a small Linux VM that writes self-checking records to its disk and dirties its memory,
live-migrates it to host B by name (agent to agent over mutual TLS; the memory stream and the disk's
relocation encrypted; the owner key moves in etcd at the commit; hybrid storage: the disk follows
through the relocation proxy) with the progress shown, prints the report, lets the guest verify
everything it wrote on B, and cleans up (agents, VMs and etcd, by pid). Every step is a ``hikkoshi``
command, shown as it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hikkoshi.cluster.etcd_process import free_ports
from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.diskwriter import verify_diskwriter_image
from hikkoshi.guest.guest_image import GuestImageError, build_guest
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.home import VmHome

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


def _shown(*args: str) -> int:
    """Run a ``hikkoshi`` command that needs no agent, showing it."""
    print(f"$ hikkoshi {' '.join(args)}", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "hikkoshi", *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        print(done.stderr, end="", file=sys.stderr)
    return done.returncode


class _Agent:
    """One host agent of the demo, as a process, with its own certificate (in ``pki/NAME``)."""

    def __init__(self, name: str, work: Path, token: Path, etcd: str, extra: list[str]) -> None:
        self.name = name
        self.datastore = work / name / "datastore"
        self.state = Path(tempfile.mkdtemp(prefix=f"hk-{name[-1]}-", dir="/tmp"))  # short: sockets
        ids = work / "pki" / name
        cmd = [sys.executable, "-m", "hikkoshi", "agent", "--name", name, "--listen", "127.0.0.1:0"]
        cmd += ["--cert", str(ids / "host-cert.pem"), "--key", str(ids / "host-key.pem")]
        cmd += ["--ca", str(ids / "ca-cert.pem")]
        cmd += ["--datastore", f"main={self.datastore}", "--state-dir", str(self.state)]
        cmd += ["--token-file", str(token), "--etcd", etcd, *extra]
        self.log = work / f"{name}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (\S+)", line)
        if m is None:
            raise RuntimeError(f"agent {name} did not start: {self.log.read_text()[-2000:]}")
        self.url = m[1]

    def home(self, vm: str) -> VmHome:
        return VmHome(self.datastore / vm)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.datastore.exists():
            for entry in Datastore.open(self.datastore).entries():
                if entry.home.is_running():
                    with contextlib.suppress(Exception):
                        control.kill_vm(entry.home)
        shutil.rmtree(self.state, ignore_errors=True)


def _hikkoshi(*args: str) -> int:
    """Run a CLI command (through the cluster: ``HIKKOSHI_ETCD`` and ``HIKKOSHI_TOKEN_FILE`` are set),
    showing it as a user would type it."""
    print(f"$ hikkoshi {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, "-m", "hikkoshi", *args], check=False).returncode


class _Etcd:
    """The demo's local etcd: ``hikkoshi cluster up --detach`` on free loopback ports, ``down`` after."""

    def __init__(self, work: Path) -> None:
        self.state = work / "cluster"
        client, peer = free_ports(2)
        self.url = f"http://127.0.0.1:{client}"
        self.up = not _hikkoshi("cluster", "up", "--state-dir", str(self.state), "--listen",
                                f"127.0.0.1:{client}", "--peer-port", str(peer), "--detach")  # fmt: skip

    def stop(self) -> None:
        if self.up:
            _hikkoshi("cluster", "down", "--state-dir", str(self.state))


def demo_command(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="hikkoshi-demo-", dir="/var/tmp"))
    token = work / "token"
    hosts: list[_Agent] = []
    etcd: _Etcd | None = None
    names = ("HIKKOSHI_ETCD", "HIKKOSHI_TOKEN_FILE", "HIKKOSHI_CA_FILE", "HIKKOSHI_AGENT")
    saved = {k: os.environ.get(k) for k in names}
    try:
        _say("building (or finding) the test guest: a Debian kernel and a busybox initramfs")
        build_guest()
        pki = work / "pki"
        _say("a cluster CA, and a certificate for each host (agents know each other by them)")
        if _shown("cluster", "init", str(pki / "ca")):
            return 1
        for name in ("host-a", "host-b"):
            if _shown(
                "cluster",
                "issue",
                name,
                "--ca",
                str(pki / "ca"),
                "--out",
                str(pki / name),
                "--address",
                "127.0.0.1",
            ):
                return 1
        _say("a local etcd holds the cluster's state: hosts, VMs and their owners, migrations")
        etcd = _Etcd(work)
        if not etcd.up:
            _say("FAILED: etcd did not start")
            return 1
        os.environ.pop("HIKKOSHI_AGENT", None)
        ca = pki / "ca" / "ca-cert.pem"
        os.environ.update(HIKKOSHI_ETCD=etcd.url, HIKKOSHI_TOKEN_FILE=str(token), HIKKOSHI_CA_FILE=str(ca))
        print(
            f"$ export HIKKOSHI_ETCD={etcd.url} HIKKOSHI_TOKEN_FILE={token} HIKKOSHI_CA_FILE={ca}", flush=True
        )
        sites: list[list[str]] = [[], []]
        if args.wan:
            link = f"site-a:site-b={args.wan}"
            sites = [["--site", "site-a", "--wan-link", link], ["--site", "site-b", "--wan-link", link]]
        hosts += [_Agent("host-a", work, token, etcd.url, sites[0])]
        hosts += [_Agent("host-b", work, token, etcd.url, sites[1])]
        a, b = hosts
        _say(f"two host agents joined the cluster: host-a at {a.url}, host-b at {b.url}")
        _hikkoshi("host", "list")
        _say(
            "between them, the memory stream and the disk's relocation are encrypted (TLS, host certificates)"
        )
        run = random.randrange(1, 2**31)
        params = [f"run={run}", "progress=8", "scrub=32", "rate=4", "mb=32"]
        create = ["vm", "create", "demo", "--host", "host-a", "--memory", "256", "--disk", "64M"]
        create += ["--guest", "busy", "--no-nic"]
        for p in params:
            create += ["--param", p]
        if _hikkoshi(*create) or _hikkoshi("vm", "start", "demo"):
            _say("FAILED: the VM did not start on host A")
            return 1
        source = a.home("demo")
        _wait_console(source, rf"HIKKOSHI-DISKWRITER PROGRESS run={run} durable=(1[6-9]|[2-9]\d|\d{{3,}}) ")
        _wait_console(source, r"HIKKOSHI-MEMDIRTY READY")
        _say("the guest writes checked records to its disk and dirties 32 MiB of memory at 4 MiB/s")
        if _hikkoshi("migrate", "demo", "--to", "host-b", "--storage", args.storage):
            _say("FAILED: the migration did not complete (the VM runs on where the report says)")
            return 1
        dest = b.home("demo")
        _hikkoshi("vm", "list")
        left = "gone" if not source.path.exists() else "still there (shared storage)"
        _say(f"VM 'demo' now runs on host B; host A's copy is {left}")
        mark = _console_len(dest)
        _wait_console(dest, rf"HIKKOSHI-DISKWRITER PROGRESS run={run} ", after=mark)
        _say("the guest goes on writing on host B; stopping it (ACPI) so it verifies everything it wrote")
        if _hikkoshi("vm", "stop", "demo"):
            _say("FAILED: the VM did not stop")
            return 1
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
        if args.keep:
            _say(f"the migration's report and timeline (PNG) are kept in {work / a.name / 'reports'}")
        return 0
    except (GuestImageError, RuntimeError, OSError, ValueError) as exc:
        _say(f"FAILED: {exc}")
        return 1
    finally:
        for host in hosts:
            if args.keep and (host.state / "reports").exists():
                shutil.copytree(host.state / "reports", work / host.name / "reports", dirs_exist_ok=True)
            host.stop()
        if etcd is not None:
            etcd.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if args.keep:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
