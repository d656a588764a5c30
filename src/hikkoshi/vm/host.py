"""This host's facts, read live: memory and CPU (``/proc``), datastore space, KVM, bridges, QEMU.

What the facts are, and the parsers of the ``/proc`` files, are in :mod:`hikkoshi.vm.facts`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

from hikkoshi.vm.accel import DEFAULT_QEMU, kvm_device_usable
from hikkoshi.vm.facts import HostFacts, SpaceFacts, parse_cpuinfo, parse_meminfo


def space(path: Path) -> SpaceFacts:
    """Capacity and free space of the file system holding ``path``."""
    st = os.statvfs(path)
    return SpaceFacts(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)


def read_bridges(sys_class_net: Path = Path("/sys/class/net")) -> frozenset[str]:
    """Names of the Linux bridges in this network namespace."""
    try:
        return frozenset(p.name for p in sys_class_net.iterdir() if (p / "bridge").is_dir())
    except OSError:
        return frozenset()


def host_facts() -> HostFacts:
    """Read this host's facts now."""
    return HostFacts(
        hostname=socket.gethostname(),
        memory=parse_meminfo(Path("/proc/meminfo").read_text()),
        cpu=parse_cpuinfo(Path("/proc/cpuinfo").read_text()),
        kvm_device=kvm_device_usable(),
        bridges=read_bridges(),
    )


def qemu_version(qemu: str = DEFAULT_QEMU) -> tuple[int, int, int]:
    """The version of a QEMU binary (0.0.0 if it cannot say)."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
        words = out.split("version", 1)[1].split()[0].split(".")
        major, minor, micro = (
            int("".join(c for c in w if c.isdigit()) or 0) for w in (words + ["0"] * 3)[:3]
        )
        return major, minor, micro
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        return 0, 0, 0


_ALIAS_RE = re.compile(r"^(\S+)\s.*\(alias of (\S+)\)")


def resolve_machine(machine: str, qemu: str = DEFAULT_QEMU) -> str:
    """The versioned machine type an alias stands for (``q35`` -> ``pc-q35-7.2``) on this QEMU.

    A VM keeps the versioned type from its creation on, so its virtual hardware stays the same
    when a newer QEMU (or a migration to a host with one) changes what the alias means.
    Unknown names and errors leave ``machine`` as it is; QEMU will say what is wrong at start.
    """
    try:
        out = subprocess.run(
            [qemu, "-machine", "help"], capture_output=True, text=True, check=False, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return machine
    for line in out.splitlines():
        m = _ALIAS_RE.match(line)
        if m and m[1] == machine:
            return m[2]
    return machine
