"""Host facts: /proc parsers on recorded samples, bridges, prechecks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hikkoshi.vm import precheck
from hikkoshi.vm.facts import parse_cpuinfo, parse_meminfo
from hikkoshi.vm.host import host_facts, read_bridges, resolve_machine, space
from hikkoshi.vm.spec import parse_spec
from tests.support.facts import facts

MEMINFO = """MemTotal:       24684136 kB
MemFree:        19759552 kB
MemAvailable:   23672320 kB
Buffers:          183100 kB
HugePages_Total:       0
"""

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse2 avx2 svm
bugs\t\t: sysret_ss_attrs

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse2 avx2 svm
"""


def test_parse_meminfo() -> None:
    mem = parse_meminfo(MEMINFO)
    assert mem.total == 24684136 * 1024 and mem.available == 23672320 * 1024
    old_kernel = parse_meminfo("MemTotal: 1000 kB\nMemFree: 500 kB\n")
    assert old_kernel.available == 500 * 1024
    with pytest.raises(ValueError):
        parse_meminfo("nothing: here\n")


def test_parse_cpuinfo() -> None:
    cpu = parse_cpuinfo(CPUINFO)
    assert (cpu.model, cpu.vendor, cpu.count) == ("AMD EPYC", "AuthenticAMD", 2)
    assert cpu.flags == {"fpu", "vme", "sse2", "avx2", "svm"}
    assert parse_cpuinfo("").count == 1


def test_live_facts_are_sane(tmp_path: Path) -> None:
    live = host_facts()
    assert 0 < live.memory.available <= live.memory.total
    assert live.cpu.count >= 1
    data = live.as_dict()
    assert isinstance(data["cpu"]["flags"], list)
    fs = space(tmp_path)
    assert 0 < fs.free <= fs.total


def test_read_bridges(tmp_path: Path) -> None:
    (tmp_path / "br0" / "bridge").mkdir(parents=True)
    (tmp_path / "eth0").mkdir()
    assert read_bridges(tmp_path) == {"br0"}
    assert read_bridges(tmp_path / "missing") == frozenset()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
def test_resolve_machine() -> None:
    assert resolve_machine("q35").startswith("pc-q35-")
    assert resolve_machine("pc").startswith("pc-i440fx-")
    assert resolve_machine("pc-q35-7.2") == "pc-q35-7.2"
    assert resolve_machine("q35", qemu="/nonexistent/qemu") == "q35"


def test_start_prechecks() -> None:
    spec = parse_spec({"name": "v", "memory_mib": 1024, "disks": [{"name": "d", "size": 512}]})
    assert precheck.check_memory_available(spec, facts(available_mib=2048)) == []
    (problem,) = precheck.check_memory_available(spec, facts(available_mib=1100))
    assert problem.startswith("memory_mib: 1024 MiB (+128 MiB for QEMU) is more than this host has available")
    assert precheck.check_cpu(spec.model_copy(update={"cpu_model": "host"}), "tcg")[0].startswith(
        "cpu_model: 'host' needs KVM"
    )
    assert precheck.check_cpu(spec.model_copy(update={"cpu_model": "host"}), "kvm") == []
    bridged = parse_spec(
        {
            "name": "v",
            "memory_mib": 64,
            "disks": [],
            "boot": {"kernel": "/k"},
            "nics": [{"network": "bridge:br9"}],
        }
    )
    assert precheck.check_networks(bridged, facts()) == [
        "nics[0].network: there is no bridge 'br9' on this host"
    ]
    assert precheck.check_networks(bridged, facts(bridges=frozenset({"br9"}))) == []
    states = [precheck.DiskState("d", True, 1024)]
    assert precheck.check_disks_present(spec, states) == ["disks[0]: d.raw has 1024 bytes, the spec says 512"]
    assert precheck.check_disks_present(spec, []) == [
        "disks[0]: the file d.raw is missing from the VM's home"
    ]


def test_uefi_needs_ovmf(tmp_path: Path) -> None:
    spec = parse_spec(
        {"name": "v", "memory_mib": 64, "disks": [{"name": "d", "size": 512}], "firmware": "uefi"}
    )
    assert precheck.check_firmware(spec, tmp_path / "code.fd", tmp_path / "vars.fd")[0].startswith(
        "firmware: uefi"
    )
    (tmp_path / "code.fd").write_bytes(b"")
    (tmp_path / "vars.fd").write_bytes(b"")
    assert precheck.check_firmware(spec, tmp_path / "code.fd", tmp_path / "vars.fd") == []
