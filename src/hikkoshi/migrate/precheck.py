"""Checks before anything moves (seeds 001, 003). Pure: each takes facts, returns problems.

The coordinator gathers the facts (the destination host's memory, CPU, space and networks, the
versions on both sides) and refuses the migration with every problem found, before it touches
anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from hikkoshi.vm.facts import HostFacts
from hikkoshi.vm.precheck import check_memory_available, check_networks
from hikkoshi.vm.spec import VmSpec


@dataclass(frozen=True)
class Side:
    """What one host says about itself."""

    facts: HostFacts
    accel: str
    """The accelerator a VM gets there (``kvm`` or ``tcg``)."""
    qemu_version: tuple[int, int, int]
    hikkoshi_version: str
    free_bytes: int
    """Free space of the datastore the VM goes to (source: where it is)."""


def check_cpu_compatible(spec: VmSpec, source: Side, dest: Side) -> list[str]:
    """A guest keeps its virtual CPU: the same accelerator, and a named CPU model or the same host CPU."""
    problems = []
    if source.accel != dest.accel:
        problems.append(f"the VM runs with {source.accel} here but would get {dest.accel} on the destination")
    host_cpu = spec.cpu_model is None or spec.cpu_model.split(",")[0] == "host"  # also host,+feature
    if host_cpu and source.accel == "kvm":
        s, d = source.facts.cpu, dest.facts.cpu
        if (s.vendor, s.model) != (d.vendor, d.model) or not s.flags <= d.flags:
            problems.append(
                "the VM uses the host CPU model and the destination's CPU differs "
                f"({d.vendor} {d.model}); give the VM a named cpu_model"
            )
    return problems


def check_versions(source: Side, dest: Side) -> list[str]:
    """QEMU accepts migration streams from its own version or older; hikkoshi must match."""
    problems = []
    if dest.qemu_version < source.qemu_version:
        v = ".".join(map(str, dest.qemu_version))
        problems.append(f"the destination's QEMU {v} is older than the source's")
    if dest.hikkoshi_version != source.hikkoshi_version:
        problems.append(
            f"hikkoshi {dest.hikkoshi_version} on the destination, {source.hikkoshi_version} here"
        )
    return problems


def check_space(needed: int, dest: Side) -> list[str]:
    """The destination datastore must hold the disks' allocated bytes."""
    if needed > dest.free_bytes:
        return [f"the destination datastore has {dest.free_bytes} bytes free; the disks need {needed}"]
    return []


def migration_problems(spec: VmSpec, source: Side, dest: Side, disk_bytes: int) -> list[str]:
    """Every reason not to migrate ``spec`` (empty: go)."""
    problems = check_memory_available(spec, dest.facts)
    problems += check_networks(spec, dest.facts)
    problems += check_cpu_compatible(spec, source, dest)
    problems += check_versions(source, dest)
    problems += check_space(disk_bytes, dest)
    return problems
