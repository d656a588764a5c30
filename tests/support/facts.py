"""Made-up host facts, for prechecks that must not depend on the machine the tests run on."""

from __future__ import annotations

from hikkoshi.vm.facts import CpuFacts, HostFacts, MemoryFacts

MIB = 1 << 20


def facts(
    total_mib: int = 16384, available_mib: int = 8192, bridges: frozenset[str] = frozenset()
) -> HostFacts:
    """A host with this much memory (in MiB) and these bridges, two CPUs, no KVM."""
    return HostFacts(
        hostname="test",
        memory=MemoryFacts(total=total_mib * MIB, available=available_mib * MIB),
        cpu=CpuFacts(model="Test CPU", vendor="Test", flags=frozenset({"sse2"}), count=2),
        kvm_device=False,
        bridges=bridges,
    )
