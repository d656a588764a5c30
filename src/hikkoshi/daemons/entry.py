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


def disk_service_argv(home: VmHome, rundir: RunDir, python: str = sys.executable) -> list[str]:
    """The VM's disk service: every disk of the VM in ``home``, on the VM's Unix socket."""
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
    ]


def image_service_argv(
    files: dict[str, Path],
    listen: str,
    control: Path,
    *,
    read_only: bool = False,
    python: str = sys.executable,
) -> list[str]:
    """A disk service over image files given by hand (``hikkoshi nbd serve``): export name to path."""
    cmd = [python, "-m", "hikkoshi", "nbd", "serve", *map(str, files.values())]
    cmd += ["--listen", listen, "--control", f"unix:{control}"]
    for name in files:
        cmd += ["--export", name]
    if read_only:
        cmd.append("--read-only")
    return cmd


def proxy_argv(
    upstream: str, cache: Path, size: int, listen: str, control: Path, python: str = sys.executable
) -> list[str]:
    """A standalone relocation proxy (``hikkoshi nbd proxy``) pulling ``upstream`` into ``cache``."""
    cmd = [python, "-m", "hikkoshi", "nbd", "proxy", "--upstream", upstream, "--cache", str(cache)]
    cmd += ["--size", str(size), "--listen", listen, "--control", f"unix:{control}"]
    return cmd


def supervisor_argv(
    home: VmHome,
    *,
    ready_fd: int,
    accel: str | None = None,
    qemu: str | None = None,
    incoming: bool = False,
    serving: bool = False,
    python: str = sys.executable,
) -> list[str]:
    """The VM's supervisor (it detaches and reports on ``ready_fd`` whether the VM came up)."""
    cmd = [python, "-m", SUPERVISOR, str(home.path.absolute()), "--ready-fd", str(ready_fd), "--daemonize"]
    if accel:
        cmd += ["--accel", accel]
    if qemu:
        cmd += ["--qemu", qemu]
    if incoming:
        cmd.append("--incoming")
    if serving:
        cmd.append("--serving")
    return cmd
