"""What is really on a host, read from the kernel and the file system rather than from what the agents
say: the processes of a VM (its QEMU, supervisor, disk service), whatever process mentions a host's
directories, the TCP ports a process listens on, the Unix sockets under a directory, and the files of a
datastore that a finished migration must not leave behind (bitmaps, disk plans, move journals, homes
of VMs that are not there).

"Where does the VM run" is answered by counting QEMU processes with the VM's uuid and telling their
host by the home their command line names (each host has its own datastores).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Files a VM's home holds while the VM runs there, moves or not (everything else is listed).
HOME_FILES = frozenset(
    {"vm.toml", "console.log", "console.log.1", "qemu.log", "nbd.log", "supervisor.log", "supervisor.pid"}
    | {"state.json", ".lock", "vmlinux", "initrd.img"}
)
#: What a finished migration leaves nowhere (a relocation's bitmap, a disk plan, a move's journal).
FORBIDDEN_SUFFIXES = (".bitmap", ".hikkoshi-move")
FORBIDDEN_NAMES = frozenset({"disks.json"})


@dataclass(frozen=True)
class Proc:
    """A process and its command line."""

    pid: int
    argv: tuple[str, ...]

    @property
    def is_qemu(self) -> bool:
        return bool(self.argv) and "qemu-system" in Path(self.argv[0]).name

    def mentions(self, text: str) -> bool:
        return any(text in arg for arg in self.argv)

    def names_path(self, root: Path | str) -> bool:
        """Whether an argument is ``root`` or names a path below it (a supervisor is given its home
        bare, QEMU names files inside it, often inside an option: ``path=HOME/...``)."""
        bare, below = str(root), str(root) + "/"
        return any(arg == bare or below in arg for arg in self.argv)

    def __str__(self) -> str:
        return f"{self.pid} {' '.join(self.argv)[:160]}"


def processes() -> list[Proc]:
    """Every live process (zombies left out)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if raw and state != "Z":
            argv = tuple(a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0"))
            out.append(Proc(int(entry), argv))
    return out


def qemus(uuid: str, procs: Iterable[Proc] | None = None) -> list[Proc]:
    """The QEMU processes of the VM with this uuid, on any host."""
    return [p for p in (processes() if procs is None else procs) if p.is_qemu and p.mentions(uuid)]


def on_host(procs: Iterable[Proc], roots: Iterable[Path], *, bare: bool = False) -> list[Proc]:
    """The processes whose command line names a path below one of ``roots`` (a host's state dir or
    datastores: the agent's own ``--state-dir PATH`` is no match), or (``bare``) the root itself (a VM's
    home, which its supervisor is given)."""
    roots = list(roots)
    if bare:
        return [p for p in procs if any(p.names_path(r) for r in roots)]
    prefixes = [str(r) + "/" for r in roots]
    return [p for p in procs if any(prefix in arg for arg in p.argv for prefix in prefixes)]


def listening_ports(pid: int) -> list[int]:
    """The TCP ports ``pid`` listens on (in its own network namespace)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def sockets_under(root: Path) -> list[Path]:
    """Every Unix socket file below ``root``."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    found.append(path)
    return sorted(found)


def stray_files(datastore: Path, keep: str | None, plan: bool = False) -> list[str]:
    """What a datastore holds beyond its marker and the home of ``keep`` (the VM running there), and
    the files in that home a finished migration must not leave (``plan``: but a disk plan, for a VM
    whose disks another host holds)."""
    problems: list[str] = []
    if not datastore.exists():
        return problems
    for entry in sorted(datastore.iterdir()):
        if entry.name in ("hikkoshi-datastore.toml", ".hikkoshi"):
            continue
        if entry.name != keep:
            problems.append(f"{entry} is left over")
            continue
        for item in sorted(entry.iterdir()):
            if plan and item.name == "disks.json":
                continue
            if item.name in FORBIDDEN_NAMES or item.name.endswith(FORBIDDEN_SUFFIXES):
                problems.append(f"{item} is left over")
    return problems


def kill_vm_processes(roots: Iterable[Path], timeout: float = 20.0, *, bare: bool = False) -> list[int]:
    """SIGKILL every process naming a path below ``roots`` (supervisors, QEMUs, disk services of test
    VMs; ``bare``: or a root itself, a VM's home), and wait until they are gone; the pids killed."""
    victims = [p.pid for p in on_host(processes(), list(roots), bare=bare) if p.pid != os.getpid()]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in victims):
        time.sleep(0.05)
    return victims


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
