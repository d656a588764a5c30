"""Facts about this host that prechecks need: memory, CPU, datastore space, KVM, bridges.

The parsers take the text of ``/proc`` files so they can be tested on recorded samples; the
``read_*`` functions read the live files.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hikkoshi.vm.accel import DEFAULT_QEMU, kvm_device_usable

MIB = 1 << 20


@dataclass(frozen=True)
class MemoryFacts:
    """From ``/proc/meminfo``, in bytes."""

    total: int
    available: int
    """``MemAvailable``: what can be given to new work without swapping."""


@dataclass(frozen=True)
class CpuFacts:
    """From ``/proc/cpuinfo``: what a guest CPU model can be checked against."""

    model: str
    vendor: str
    flags: frozenset[str]
    count: int


@dataclass(frozen=True)
class SpaceFacts:
    """From ``statvfs`` of a directory's file system, in bytes."""

    total: int
    free: int
    """Free for an unprivileged user (``f_bavail``), which is what a VM's files may count on."""


@dataclass(frozen=True)
class HostFacts:
    """Everything a precheck asks about this host."""

    hostname: str
    memory: MemoryFacts
    cpu: CpuFacts
    kvm_device: bool
    """``/dev/kvm`` can be opened; whether KVM really runs guests is
    :func:`~hikkoshi.vm.accel.detect_accel`'s question."""
    bridges: frozenset[str]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (flags sorted)."""
        data = asdict(self)
        data["cpu"]["flags"] = sorted(self.cpu.flags)
        data["bridges"] = sorted(self.bridges)
        return data


def parse_meminfo(text: str) -> MemoryFacts:
    """Parse ``/proc/meminfo`` (values in kB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * 1024
    if "MemTotal" not in values:
        raise ValueError("no MemTotal in /proc/meminfo")
    # Kernels before 3.14 have no MemAvailable; free memory is the cautious stand-in.
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return MemoryFacts(total=values["MemTotal"], available=available)


def parse_cpuinfo(text: str) -> CpuFacts:
    """Parse ``/proc/cpuinfo`` (x86 layout; other architectures give empty model and flags)."""
    model = vendor = ""
    flags: frozenset[str] = frozenset()
    count = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            count += 1
        elif key == "model name" and not model:
            model = value
        elif key == "vendor_id" and not vendor:
            vendor = value
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuFacts(model=model, vendor=vendor, flags=flags, count=max(count, 1))


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
