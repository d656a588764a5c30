"""Facts about a host that prechecks need (memory, CPU, space, KVM device, bridges), and the parsers of
the ``/proc`` files they come from. Pure: the parsers take the files' text, so they can be tested on
recorded samples; :mod:`hikkoshi.vm.host` reads the live files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
