"""QEMU, NBD service and tap command lines built from specs (pure)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from hikkoshi.daemons.entry import disk_service_argv
from hikkoshi.vm import tap
from hikkoshi.vm.disk_serving import DiskPlan, DiskServing, Serving
from hikkoshi.vm.errors import VmStartError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.qemu import cpu_model, qemu_command
from hikkoshi.vm.rundir import RunDir, runtime_root
from hikkoshi.vm.spec import VmSpec, parse_spec

UUID1 = "12345678-9abc-def0-1234-56789abcdef0"


def make_spec(**changes: Any) -> VmSpec:
    data: dict[str, Any] = {
        "name": "web",
        "uuid": UUID1,
        "memory_mib": 512,
        "cpus": 2,
        "disks": [{"name": "root", "size": "1G"}, {"name": "data", "size": "64M"}],
        "nics": [
            {"mac": "52:54:00:00:00:01", "forwards": [{"host_port": 8022, "guest_port": 22}]},
            {"mac": "52:54:00:00:00:02", "network": "bridge:br0"},
        ],
    }
    data.update(changes)
    return parse_spec(data)


def values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]


@pytest.fixture
def home(tmp_path: Path) -> VmHome:
    return VmHome(tmp_path / "web")


@pytest.fixture
def rundir() -> RunDir:
    return RunDir(Path("/run/hk") / UUID1)


def test_basic_machine(home: VmHome, rundir: RunDir) -> None:
    cmd = qemu_command(make_spec(), home, rundir, accel="tcg", taps={1: "hk12345678n1"})
    assert cmd[0] == "qemu-system-x86_64"
    assert values(cmd, "-accel") == ["tcg"]
    assert values(cmd, "-cpu") == ["qemu64"]
    assert values(cmd, "-m") == ["512"] and values(cmd, "-smp") == ["2"]
    assert values(cmd, "-machine") == ["q35"]
    assert values(cmd, "-uuid") == [UUID1]
    assert "-S" in cmd and "-nodefaults" in cmd  # starts paused; only the devices we name
    assert "-no-reboot" not in cmd
    assert "-no-reboot" in qemu_command(
        make_spec(on_reboot="poweroff"), home, rundir, accel="tcg", taps={1: "t"}
    )
    assert "chardev=qmp,mode=control" in values(cmd, "-mon")
    assert f"socket,id=qmp,path={rundir.qmp_socket}" in values(cmd, "-chardev")
    assert f"file,id=console,path={home.console_log}" in values(cmd, "-chardev")
    assert "-kernel" not in cmd


def test_disks_are_nbd_exports(home: VmHome, rundir: RunDir) -> None:
    cmd = qemu_command(make_spec(), home, rundir, accel="tcg", taps={1: "t"})
    nodes = [json.loads(v) for v in values(cmd, "-blockdev")]
    assert nodes[0] == {
        "driver": "nbd",
        "node-name": "nbd-root",
        "server": {"type": "unix", "path": str(rundir.nbd_socket)},
        "export": "root",
        "discard": "unmap",
        "reconnect-delay": 15,
    }
    assert nodes[1] == {"driver": "raw", "node-name": "disk-root", "file": "nbd-root", "discard": "unmap"}
    assert nodes[3]["file"] == "nbd-data" and nodes[2]["export"] == "data"
    devices = [d for d in values(cmd, "-device") if d.startswith("virtio-blk")]
    assert devices == [
        "virtio-blk-pci,id=vd-root,drive=disk-root,serial=root,werror=stop,rerror=stop,bootindex=1",
        "virtio-blk-pci,id=vd-data,drive=disk-data,serial=data,werror=stop,rerror=stop",
    ]


def test_disk_geometry_from_an_incoming_plan(home: VmHome, rundir: RunDir) -> None:
    """A migration's destination gets the source's disk geometry: QEMU does not guess it from the first
    sector (a read that waits for the source through a proxy); a proxy knows its disk's size at once."""
    plan = DiskPlan(
        migration="m1",
        disks={"data": DiskServing(kind=Serving.RELOCATING, upstream="nbd://h:1/data")},
        geometry={"data": (130, 16, 63)},
    )
    cmd = qemu_command(make_spec(), home, rundir, accel="tcg", taps={1: "t"}, plan=plan, incoming=True)
    devices = [d for d in values(cmd, "-device") if d.startswith("virtio-blk")]
    assert devices[1].endswith(",cyls=130,heads=16,secs=63") and "cyls" not in devices[0]
    # Whatever serves a disk, QEMU opens it at the VM's own disk service.
    nodes = [json.loads(v) for v in values(cmd, "-blockdev")]
    assert {n["server"]["path"] for n in nodes if n["driver"] == "nbd"} == {str(rundir.nbd_socket)}


def test_nics(home: VmHome, rundir: RunDir) -> None:
    cmd = qemu_command(make_spec(), home, rundir, accel="tcg", taps={1: "hk12345678n1"})
    assert values(cmd, "-netdev") == [
        "user,id=net0,hostfwd=tcp:127.0.0.1:8022-:22",
        "tap,id=net1,ifname=hk12345678n1,script=no,downscript=no",
    ]
    nics = [d for d in values(cmd, "-device") if d.startswith("virtio-net")]
    assert nics == [
        "virtio-net-pci,id=nic0,netdev=net0,mac=52:54:00:00:00:01",
        "virtio-net-pci,id=nic1,netdev=net1,mac=52:54:00:00:00:02",
    ]
    with pytest.raises(ValueError, match="no tap"):
        qemu_command(make_spec(), home, rundir, accel="tcg")


def test_kernel_boot_and_relative_paths(home: VmHome, rundir: RunDir) -> None:
    spec = make_spec(
        boot={"kernel": "vmlinux", "initrd": "/abs/initrd.img", "append": "console=ttyS0 a,b"}, nics=[]
    )
    cmd = qemu_command(spec, home, rundir, accel="kvm")
    assert values(cmd, "-kernel") == [str(home.path / "vmlinux")]
    assert values(cmd, "-initrd") == ["/abs/initrd.img"]
    assert values(cmd, "-append") == ["console=ttyS0 a,b"]
    assert not any("bootindex" in d for d in values(cmd, "-device"))
    assert values(cmd, "-cpu") == ["host"]


def test_boot_disk_and_uefi(home: VmHome, rundir: RunDir) -> None:
    spec = make_spec(boot={"disk": "data"}, firmware="uefi", nics=[])
    cmd = qemu_command(spec, home, rundir, accel="tcg", ovmf_code=Path("/fw/CODE,1.fd"))
    assert [d for d in values(cmd, "-device") if "bootindex" in d] == [
        "virtio-blk-pci,id=vd-data,drive=disk-data,serial=data,werror=stop,rerror=stop,bootindex=1"
    ]
    assert values(cmd, "-drive") == [
        "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE,,1.fd",
        f"if=pflash,format=raw,unit=1,file={home.path / 'uefi-vars.fd'}",
    ]


def test_same_spec_same_hardware(home: VmHome, rundir: RunDir, tmp_path: Path) -> None:
    spec = make_spec()
    a = qemu_command(spec, home, rundir, accel="tcg", taps={1: "t"})
    b = qemu_command(
        spec, VmHome(tmp_path / "elsewhere" / "web"), RunDir(Path("/x") / UUID1), accel="tcg", taps={1: "t"}
    )
    assert values(a, "-device") == values(b, "-device")


def test_cpu_model() -> None:
    assert cpu_model(make_spec(), "kvm") == "host"
    assert cpu_model(make_spec(), "tcg") == "qemu64"
    assert cpu_model(make_spec(cpu_model="EPYC-v4"), "kvm") == "EPYC-v4"


def test_disk_service_command(home: VmHome, rundir: RunDir) -> None:
    cmd = disk_service_argv(home, rundir)
    assert cmd[:3] == [sys.executable, "-m", "hikkoshi.daemons.disk_service"]
    assert values(cmd, "--home") == [str(home.path)]
    assert values(cmd, "--listen") == [f"unix:{rundir.nbd_socket}"]
    assert values(cmd, "--control") == [f"unix:{rundir.nbd_control}"]


def test_tap_commands() -> None:
    name = tap.tap_name(UUID(UUID1), 3)
    assert name == "hk12345678n3" and len(name) <= 15
    a, b = tap.tap_name(UUID(UUID1), 3, "/run/a"), tap.tap_name(UUID(UUID1), 3, "/run/b")
    assert (
        a != b and a.startswith("hk123456") and len(a) <= 15 and a == tap.tap_name(UUID(UUID1), 3, "/run/a")
    )
    assert tap.tap_mac("52:54:00:ab:cd:ef") == "fe:54:00:ab:cd:ef"
    assert tap.create_commands(name, "br0", "52:54:00:ab:cd:ef") == [
        ["ip", "tuntap", "add", "dev", name, "mode", "tap"],
        ["ip", "link", "set", "dev", name, "address", "fe:54:00:ab:cd:ef"],
        ["ip", "link", "set", "dev", name, "master", "br0"],
        ["ip", "link", "set", "dev", name, "up"],
    ]
    assert tap.delete_command(name) == ["ip", "link", "del", "dev", name]


def test_rundir(tmp_path: Path) -> None:
    assert runtime_root({"HIKKOSHI_RUNTIME_DIR": "/r"}) == Path("/r")
    assert runtime_root({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path("/run/user/7/hikkoshi")
    run = RunDir.for_vm(UUID(UUID1), tmp_path)
    run.create()
    assert (run.path.stat().st_mode & 0o777) == 0o700
    (run.path / "stale.sock").write_text("")
    run.create()  # a leftover directory is replaced
    assert list(run.path.iterdir()) == []
    run.remove()
    assert not run.path.exists()
    deep = RunDir.for_vm(UUID(UUID1), tmp_path / ("d" * 80))
    with pytest.raises(VmStartError, match="too deep for Unix sockets"):
        deep.create()
