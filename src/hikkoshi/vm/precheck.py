"""Prechecks: can this host create or start this VM? Pure functions of a spec and facts.

Each check returns a list of problems, one readable line each (empty: fine); the callers raise
:class:`~hikkoshi.vm.errors.PrecheckError` with all of them, so a user fixes everything in one go.
The migration layer will ask the same questions of a destination host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hikkoshi.vm.facts import HostFacts
from hikkoshi.vm.spec import VmSpec, format_size

MIB = 1 << 20
QEMU_OVERHEAD = 128 * MIB
"""Memory a QEMU process needs beyond the guest's RAM (device state, TCG code cache, ...)."""

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@dataclass(frozen=True)
class DiskState:
    """What is on the host for one disk of the spec."""

    name: str
    exists: bool
    size: int


def check_memory_total(spec: VmSpec, facts: HostFacts) -> list[str]:
    """The VM's memory must fit into the host's memory at all."""
    want = spec.memory_mib * MIB
    if want > facts.memory.total:
        return [
            f"memory_mib: {spec.memory_mib} MiB is more than this host has "
            f"({format_size(facts.memory.total)} in all)"
        ]
    return []


def check_memory_available(spec: VmSpec, facts: HostFacts) -> list[str]:
    """The VM's memory (and QEMU's own) must fit into what the host has available now."""
    want = spec.memory_mib * MIB + QEMU_OVERHEAD
    if want > facts.memory.available:
        return [
            f"memory_mib: {spec.memory_mib} MiB (+{QEMU_OVERHEAD // MIB} MiB for QEMU) is more than "
            f"this host has available ({format_size(facts.memory.available)})"
        ]
    return []


def check_boot_files(spec: VmSpec, home: Path) -> list[str]:
    """The kernel and initrd a spec names must be readable files (relative ones in the home)."""
    problems = []
    for field in ("kernel", "initrd"):
        path = getattr(spec.boot, field)
        if path is None:
            continue
        full = path if path.is_absolute() else home / path
        if not full.exists():
            problems.append(f"boot.{field}: {full} does not exist")
        elif not full.is_file():
            problems.append(f"boot.{field}: {full} is not a file")
    return problems


def check_unique_macs(spec: VmSpec, others: Iterable[VmSpec]) -> list[str]:
    """No NIC of the VM may share its MAC with a NIC of another VM of the datastore."""
    owners = {nic.mac: other.name for other in others if other.uuid != spec.uuid for nic in other.nics}
    return [
        f"nics[{i}].mac: {nic.mac} is already used by VM {owners[nic.mac]!r} in this datastore"
        for i, nic in enumerate(spec.nics)
        if nic.mac in owners
    ]


def check_thick_space(spec: VmSpec, free: int) -> list[str]:
    """Thick disks are allocated at once: they must fit into the datastore's free space."""
    need = sum(d.size for d in spec.disks if d.provisioning == "thick")
    if need > free:
        return [
            f"disks: the thick disks need {format_size(need)}, the datastore has {format_size(free)} free"
        ]
    return []


def check_disks_present(spec: VmSpec, disks: Iterable[DiskState], elsewhere: Iterable[str] = ()) -> list[str]:
    """Every disk file must be there, of the size the spec says (but the disks served from ``elsewhere``:
    a relocation makes its own file, a remote disk has none here)."""
    found = {d.name: d for d in disks}
    skip = set(elsewhere)
    problems = []
    for i, disk in enumerate(spec.disks):
        if disk.name in skip:
            continue
        state = found.get(disk.name)
        if state is None or not state.exists:
            problems.append(f"disks[{i}]: the file {disk.file_name} is missing from the VM's home")
        elif state.size != disk.size:
            problems.append(f"disks[{i}]: {disk.file_name} has {state.size} bytes, the spec says {disk.size}")
    return problems


def check_networks(spec: VmSpec, facts: HostFacts) -> list[str]:
    """Bridged NICs need their bridge on this host."""
    return [
        f"nics[{i}].network: there is no bridge {nic.bridge!r} on this host"
        for i, nic in enumerate(spec.nics)
        if nic.bridge is not None and nic.bridge not in facts.bridges
    ]


def check_cpu(spec: VmSpec, accel: str) -> list[str]:
    """``-cpu host`` passes the host's CPU through, which only KVM can do."""
    if spec.cpu_model is not None and spec.cpu_model.split(",")[0] == "host" and accel != "kvm":
        return [
            f"cpu_model: 'host' needs KVM, and this VM would run under {accel}; name a model such as qemu64"
        ]
    return []


def check_firmware(spec: VmSpec, code: Path = OVMF_CODE, vars_template: Path = OVMF_VARS) -> list[str]:
    """UEFI needs OVMF (Debian package ``ovmf``)."""
    if spec.firmware == "uefi" and not (code.is_file() and vars_template.is_file()):
        return [f"firmware: uefi needs {code} and {vars_template} (install the ovmf package)"]
    return []
