"""`hikkoshi datastore`, `guest`, `host` and `vm` as a user runs them: messages and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hikkoshi.vm.datastore import Datastore
from tests.support import vms
from tests.support.cli import hikkoshi

short_runtime_dir = vms.short_runtime_dir


def ok(*args: str) -> str:
    proc = hikkoshi(*args)
    assert proc.returncode == 0, f"hikkoshi {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture
def ds(tmp_path: Path) -> str:
    path = tmp_path / "ds"
    ok("datastore", "init", str(path))
    return str(path)


def test_datastore_init_and_info(ds: str) -> None:
    info = json.loads(ok("datastore", "info", ds, "--json"))
    assert info["path"] == ds and info["vms"] == [] and info["free"] > 0
    assert "capacity" in ok("datastore", "info", ds)
    host = json.loads(ok("host", "info", "--datastore", ds))
    assert host["memory"]["total"] > 0 and host["datastores"][0]["path"] == ds


def test_create_refusals_are_clear(ds: str, tmp_path: Path) -> None:
    proc = hikkoshi(
        "vm", "create", "a", "--datastore", str(tmp_path / "nope"), "--memory", "64", "--disk", "1M"
    )
    assert proc.returncode == 1
    assert proc.stderr == f"hikkoshi vm create: unknown datastore {tmp_path / 'nope'}: no such directory\n"

    proc = hikkoshi("vm", "create", "a", "--datastore", ds, "--memory", "64", "--kernel", str(tmp_path / "k"))
    assert proc.returncode == 1
    assert f"boot.kernel: {tmp_path / 'k'} does not exist" in proc.stderr

    proc = hikkoshi("vm", "create", "a", "--datastore", ds, "--memory", str(1 << 24), "--disk", "1M")
    assert proc.returncode == 1
    assert "memory_mib: 16777216 MiB is more than this host has" in proc.stderr

    proc = hikkoshi("vm", "create", "a", "--datastore", ds, "--memory", "64", "--disk", "1Q")
    assert proc.returncode == 1
    assert "disks[0].size: '1Q' is not a size" in proc.stderr

    mac = "52:54:00:aa:bb:cc"
    ok("vm", "create", "a", "--datastore", ds, "--memory", "64", "--disk", "1M", "--mac", mac)
    proc = hikkoshi("vm", "create", "b", "--datastore", ds, "--memory", "64", "--disk", "1M", "--mac", mac)
    assert proc.returncode == 1
    assert f"nics[0].mac: {mac} is already used by VM 'a' in this datastore" in proc.stderr
    assert [e.name for e in Datastore.open(Path(ds)).entries()] == ["a"]


def test_create_options(ds: str) -> None:
    out = ok(
        "vm", "create", "opts", "--datastore", ds, "--memory", "128", "--cpus", "2",
        "--disk", "8M", "--disk", "4M:thick", "--nic", "user", "--nic", "bridge:br0",
        "--forward", "2222:22", "--forward", "0.0.0.0:8080:80/udp", "--cpu-model", "qemu64",
    )  # fmt: skip
    assert "disk disk1: 4 MiB thick" in out
    _home, spec = Datastore.open(Path(ds)).lookup("opts")
    assert spec.machine.startswith("pc-q35-")  # pinned to this QEMU's version
    assert [n.network for n in spec.nics] == ["user", "bridge:br0"]
    forwards = spec.nics[0].forwards
    assert (str(forwards[0].host_address), forwards[0].host_port, forwards[0].guest_port) == (
        "127.0.0.1",
        2222,
        22,
    )
    assert (str(forwards[1].host_address), forwards[1].protocol) == ("0.0.0.0", "udp")
    proc = hikkoshi(
        "vm", "create", "x", "--datastore", ds, "--memory", "64", "--disk", "1M", "--forward", "22"
    )
    assert proc.returncode == 1 and "expected [ADDR:]HOSTPORT:GUESTPORT" in proc.stderr


def test_vm_commands_on_stopped_and_missing_vms(ds: str) -> None:
    ok("vm", "create", "idle", "--datastore", ds, "--memory", "64", "--disk", "1M")
    assert ok("vm", "status", "idle", "--datastore", ds) == "VM 'idle': stopped\n"
    proc = hikkoshi("vm", "pause", "idle", "--datastore", ds)
    assert proc.returncode == 1 and "VM 'idle' is not running" in proc.stderr
    proc = hikkoshi("vm", "stop", "ghost", "--datastore", ds)
    assert proc.returncode == 1 and "no VM named 'ghost'" in proc.stderr
    assert hikkoshi("vm", "destroy", "idle", "--datastore", ds).returncode == 2  # needs --yes
    assert "idle" in ok("vm", "list", "--datastore", ds)
    ok("vm", "destroy", "idle", "--datastore", ds, "--yes")
    assert ok("vm", "list", "--datastore", ds) == ""


def test_guest_cmdline() -> None:
    assert ok("guest", "cmdline", "diskwriter", "run=5").strip() == (
        "console=ttyS0 panic=-1 hikkoshi.workload=diskwriter hikkoshi.run=5"
    )
    assert "memdirty" in ok("guest", "workloads")


@pytest.mark.slow
def test_lifecycle_through_the_cli(ds: str) -> None:
    vms.need_qemu_tools()
    ok("guest", "build")
    ok("vm", "create", "life", "--datastore", ds, "--memory", "256", "--disk", "16M", "--guest", "idle")
    out = ok("vm", "start", "life", "--datastore", ds)
    assert out.startswith("started VM 'life': supervisor pid ")
    proc = hikkoshi("vm", "start", "life", "--datastore", ds)
    assert proc.returncode == 1 and "running already" in proc.stderr
    try:
        assert ok("vm", "pause", "life", "--datastore", ds) == "VM 'life': paused\n"
        status = json.loads(ok("vm", "status", "life", "--datastore", ds, "--json"))
        assert status["running"] and status["state"] == "paused" and status["nbd_running"]
        assert ok("vm", "resume", "life", "--datastore", ds) == "VM 'life': running\n"
        home = Datastore.open(Path(ds)).home("life")
        vms.wait_console(home, "HIKKOSHI-IDLE READY")
        assert "HIKKOSHI-IDLE READY" in ok("vm", "console", "life", "--datastore", ds)
        proc = hikkoshi("vm", "destroy", "life", "--datastore", ds, "--yes")
        assert proc.returncode == 1 and "is running; stop it first" in proc.stderr
        assert ok("vm", "stop", "life", "--datastore", ds) == "stopped VM 'life' (acpi, QEMU status 0)\n"
    finally:
        hikkoshi("vm", "stop", "life", "--datastore", ds, "--force")
    assert "HIKKOSHI-IDLE STOPPED" in ok("vm", "console", "life", "--datastore", ds)
    assert ok("vm", "status", "life", "--datastore", ds).startswith("VM 'life': stopped; last exit: acpi")
    ok("vm", "destroy", "life", "--datastore", ds, "--yes")
