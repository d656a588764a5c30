"""The entry points of hikkoshi's long-running processes, as the command lines that start them.

Whoever starts one of them (the VM's supervisor starts its disk service; ``vm start`` and a
migration's destination start a supervisor) calls the function named for what it starts; nothing
else spells out these command lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hikkoshi.vm.home import VmHome
from hikkoshi.vm.rundir import RunDir

DISK_SERVICE = "hikkoshi.daemons.disk_service"
#: What the disk service prints, one line per address, once it serves (starters wait for it).
READY_PREFIX = "hikkoshi: serving"
SUPERVISOR = "hikkoshi.daemons.supervisor"


def disk_service_argv(
    home: VmHome, rundir: RunDir, python: str = sys.executable, tls_dir: Path | None = None
) -> list[str]:
    """The VM's disk service: every disk of the VM in ``home``, on the VM's Unix socket (``tls_dir``:
    the host's TLS files, for disks read from another host)."""
    tls = ["--tls-dir", str(tls_dir.absolute())] if tls_dir is not None else []
    return [
        python,
        "-m",
        DISK_SERVICE,
        "--home",
        str(home.path.absolute()),
        "--listen",
        f"unix:{rundir.nbd_socket}",
        "--control",
        f"unix:{rundir.nbd_control}",
        *tls,
    ]


def image_service_argv(
    files: dict[str, Path],
    listen: str,
    control: Path,
    *,
    read_only: bool = False,
    python: str = sys.executable,
    tls_dir: Path | None = None,
    peer: str | None = None,
) -> list[str]:
    """A disk service over image files given by hand (``hikkoshi nbd serve``): export name to path;
    with ``tls_dir`` (the host's TLS files) clients need a certificate of its CA, naming ``peer`` if given."""
    cmd = [python, "-m", "hikkoshi", "nbd", "serve", *map(str, files.values())]
    cmd += ["--listen", listen, "--control", f"unix:{control}"]
    for name in files:
        cmd += ["--export", name]
    if read_only:
        cmd.append("--read-only")
    if tls_dir is not None:
        cmd += ["--tls-dir", str(tls_dir.absolute())]
        if peer is not None:
            cmd += ["--tls-peer", peer]
    return cmd


def proxy_argv(
    upstream: str,
    cache: Path,
    size: int,
    listen: str,
    control: Path,
    python: str = sys.executable,
    *,
    tls_dir: Path | None = None,
) -> list[str]:
    """A standalone relocation proxy (``hikkoshi nbd proxy``) pulling ``upstream`` into ``cache``
    (``tls_dir``: the host's TLS files, for an ``nbds://`` upstream)."""
    cmd = [python, "-m", "hikkoshi", "nbd", "proxy", "--upstream", upstream, "--cache", str(cache)]
    cmd += ["--size", str(size), "--listen", listen, "--control", f"unix:{control}"]
    if tls_dir is not None:
        cmd += ["--tls-dir", str(tls_dir.absolute())]
    return cmd


def supervisor_argv(
    home: VmHome,
    *,
    ready_fd: int,
    accel: str | None = None,
    qemu: str | None = None,
    incoming: bool = False,
    serving: bool = False,
    tls_dir: Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The VM's supervisor (it detaches and reports on ``ready_fd`` whether the VM came up;
    ``tls_dir``: the host's TLS files, handed to the disk service)."""
    cmd = [python, "-m", SUPERVISOR, str(home.path.absolute()), "--ready-fd", str(ready_fd), "--daemonize"]
    if accel:
        cmd += ["--accel", accel]
    if qemu:
        cmd += ["--qemu", qemu]
    if incoming:
        cmd.append("--incoming")
    if serving:
        cmd.append("--serving")
    if tls_dir is not None:
        cmd += ["--tls-dir", str(tls_dir.absolute())]
    return cmd
