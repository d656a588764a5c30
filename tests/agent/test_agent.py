"""End to end through the command line only: real agents (processes), a real TCG guest, a live migration
between them, and an agent killed in the middle of one."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.vm.datastore import Datastore
from tests.support.agent_vms import create_busy, stop_and_verify, vm_names, wait_console
from tests.support.agents import AgentProc, agents, kernel
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_cli_migrates_a_busy_guest_between_two_agents(guest: GuestImage, tmp_path: Path) -> None:
    need_qemu_tools()
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "alpha", "beta") as (a, b):
        create_busy(a, "mover", run)
        # A slow background copy: the guest runs on B for seconds while its disk still arrives.
        record = a.json("migrate", "mover", "--to", b.url, "--disk-bandwidth", "512K", "--json", timeout=600)
        assert record["phase"] == "done", record
        assert record["role"] == "source" and record["destination"] == b.url
        report = record["report"]
        assert report["storage"] == "hybrid" and report["downtime_ms"] is not None
        assert report["encrypted"] is True  # every stream between the hosts, by default
        assert report["time_to_destination_s"] > 0 and report["disk_fetch"]["disk0"]
        # The VM is B's now, and gone from A with its home; there it is root's alone.
        assert _mode(b.datastores["main"] / "mover") == 0o700
        assert _mode(b.datastores["main"] / "mover" / "disk0.raw") == 0o600
        assert vm_names(b) == {"mover": "running"}
        assert vm_names(a) == {}
        assert not (a.datastores["main"] / "mover").exists()
        # History with the report, and a PNG of the timeline.
        history = a.json("migrations", "--json")
        assert [m["id"] for m in history] == [record["id"]]
        shown = a.cli("migrations", "show", record["id"]).stdout
        assert f"migration {record['id']}: VM mover, storage hybrid: done" in shown
        png = a.request("GET", f"/v1/migrations/{record['id']}/timeline.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert (a.state_dir / "reports" / f"{record['id']}.json").exists()
        # The timeline has the guest's I/O latency on both sides, and the destination cache filling.
        samples = [json.loads(d) for (d,) in sqlite3.connect(a.state_dir / "agent.sqlite3").execute(
            "SELECT data FROM samples WHERE migration = ? ORDER BY t", (record["id"],))]  # fmt: skip
        assert {s["io_at"] for s in samples if "io_latency_ms" in s} == {"source", "destination"}
        filled = [s["disk_done"] / s["disk_total"] for s in samples if s.get("disk_total")]
        assert filled and filled[-1] == 1.0 and min(filled) < 1.0
        # The guest goes on writing on B; then it checks everything it wrote, and so does the host.
        mark = len(b.cli("vm", "console", "mover").stdout)
        wait_console(b, "mover", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(b, "mover", run, mark)
        # B's agent, restarted, knows the VM as its own: B can move it back and A refuses nothing.
        b.stop()
        b.start()
        assert vm_names(b) == {"mover": "stopped"}


@pytest.mark.slow
def test_quick_migration_between_agents(guest: GuestImage, tmp_path: Path) -> None:
    """--quick: the guest is suspended, its state and disks move, and it resumes on the destination."""
    need_qemu_tools()
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "alpha", "beta") as (a, b):
        create_busy(a, "sleeper", run)
        record = a.json("migrate", "sleeper", "--to", b.url, "--quick", "--json", timeout=600)
        assert record["phase"] == "done" and record["kind"] == "quick", record
        report = record["report"]
        assert report["memory_bytes"] <= report["memory_total_bytes"] * 1.05  # one pass: nothing re-sent
        assert vm_names(b) == {"sleeper": "running"} and vm_names(a) == {}
        mark = len(b.cli("vm", "console", "sleeper").stdout)
        wait_console(b, "sleeper", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(b, "sleeper", run, mark)


@pytest.mark.slow
def test_offline_migration_between_agents(guest: GuestImage, tmp_path: Path) -> None:
    """--offline: a powered-off VM's files and disks move (the destination pulls the disks from a
    read-only export; holes stay holes); it boots on the destination with everything it wrote."""
    need_qemu_tools()
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "alpha", "beta") as (a, b):
        create_busy(a, "cold", run)
        stop_and_verify(a, "cold", run, 0)
        running = a.cli("migrate", "cold", "--to", b.url, "--offline", "--json", check=False)
        assert running.returncode == 0  # stopped: allowed
        record = json.loads(running.stdout)
        assert record["phase"] == "done" and record["kind"] == "cold", record
        assert vm_names(b) == {"cold": "stopped"} and vm_names(a) == {}
        disk = b.datastores["main"] / "cold" / "disk0.raw"
        assert _mode(disk.parent) == 0o700 and _mode(disk) == 0o600
        assert _mode(disk.parent / "vm.toml") == 0o600  # the home's files, as they came in the archive
        assert disk.stat().st_size == 32 << 20 and disk.stat().st_blocks * 512 < 32 << 20  # sparse
        assert not disk.with_name("disk0.raw.bitmap").exists()
        assert "HIKKOSHI-DISKWRITER DONE" in b.cli("vm", "console", "cold").stdout  # its log came along
        b.cli("vm", "start", "cold", timeout=300)
        mark = 0
        wait_console(b, "cold", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(b, "cold", run, mark)
        # A running VM is refused (nothing moves), with the reason.
        b.cli("vm", "start", "cold", timeout=300)
        refused = b.cli("migrate", "cold", "--to", a.url, "--offline", "--json", check=False)
        assert refused.returncode == 2 and "is running" in json.loads(refused.stdout)["error"]
        assert vm_names(b) == {"cold": "running"} and vm_names(a) == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash_at", "outcome"), [("memory-precopy", "rolled-back"), ("storage-post", "done")]
)
def test_agent_killed_mid_migration_finishes_or_rolls_back_after_restart(
    guest: GuestImage, tmp_path: Path, crash_at: str, outcome: str
) -> None:
    """The source's agent dies (SIGKILL) right after recording a phase; started again, it takes the
    migration over by itself: rolled back before the commit point, finished after it. The VM runs in
    exactly one place and its data verifies."""
    need_qemu_tools()
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "alpha", "beta") as (a, b):
        create_busy(a, "crashy", run)
        a.stop()
        a.env["HIKKOSHI_CRASH_AT"] = f"migrate-{crash_at}"
        a.start()
        assert vm_names(a) == {"crashy": "running"}  # re-adopted: the VM ran on without its agent
        died = a.cli("migrate", "crashy", "--to", b.url, "--json", check=False, timeout=600)
        assert died.returncode == 3, died.stdout + died.stderr  # the agent stopped answering
        assert a.stop() == -signal.SIGKILL
        a.env.pop("HIKKOSHI_CRASH_AT")
        a.start()
        history = a.json("migrations", "--json")
        assert len(history) == 1
        migration = history[0]["id"]
        deadline = time.monotonic() + 300
        while (info := a.json("migrations", "show", migration, "--json"))["running"]:
            assert time.monotonic() < deadline, info
            time.sleep(0.5)
        assert info["phase"] == outcome, info
        assert info["report"].get("recovered") is True
        live, gone = (b, a) if outcome == "done" else (a, b)
        assert vm_names(live) == {"crashy": "running"}
        assert vm_names(gone) == {}
        assert not (gone.datastores["main"] / "crashy").exists()
        mark = len(live.cli("vm", "console", "crashy").stdout)
        wait_console(live, "crashy", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(live, "crashy", run, mark)


@pytest.mark.slow
def test_storage_migration_through_the_agent(guest: GuestImage, tmp_path: Path) -> None:
    """storage-migrate --datastore NAME: the running VM's home and disks move to another datastore."""
    need_qemu_tools()
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "solo", datastores=("main", "fast")) as (a,):
        create_busy(a, "mover", run)
        before = a.json("vm", "show", "mover", "--json")
        record = a.json("storage-migrate", "mover", "--datastore", "fast", "--json", timeout=600)
        assert record["phase"] == "done" and record["kind"] == "storage" and record["role"] == "storage"
        after = a.json("vm", "show", "mover", "--json")
        assert after["datastore"] == "fast" and after["qemu_pid"] == before["qemu_pid"]  # the same QEMU
        assert not (a.datastores["main"] / "mover").exists()
        a.datastores["main"] = a.datastores["fast"]  # where stop_and_verify finds the disk now
        mark = len(a.cli("vm", "console", "mover").stdout)
        wait_console(a, "mover", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(a, "mover", run, mark)
        same = a.cli("storage-migrate", "mover", "--datastore", "fast", "--json", check=False)
        assert same.returncode == 2 and "already" in same.stderr


def test_vm_lifecycle_and_errors_through_the_cli(tmp_path: Path) -> None:
    """Create, list, show, destroy; and the errors a user meets, each with its exit status."""
    with agents(tmp_path, "solo") as (a,):
        k = kernel(tmp_path)
        a.cli("vm", "create", "plain", "--memory", "64", "--disk", "16M", "--disk", "8M:thick", "--no-nic",
              "--kernel", k)  # fmt: skip
        shown = a.json("vm", "show", "plain", "--json")
        assert shown["state"] == "stopped" and [d["size"] for d in shown["disks"]] == [16 << 20, 8 << 20]
        assert (a.datastores["main"] / "plain" / "disk0.raw").exists()
        dup = a.cli("vm", "create", "plain", "--memory", "64", "--kernel", k, check=False)
        assert dup.returncode == 2 and "exists" in dup.stderr
        huge = a.cli("vm", "create", "huge", "--memory", str(1 << 20), "--kernel", k, check=False)
        assert huge.returncode == 2 and "memory" in huge.stderr
        missing = a.cli("vm", "start", "nosuch", check=False)
        assert missing.returncode == 2 and "no VM named 'nosuch'" in missing.stderr
        stop = a.cli("vm", "stop", "plain", check=False)
        assert stop.returncode == 2 and "not running" in stop.stderr
        no_dest = a.cli("migrate", "plain", "--to", "https://127.0.0.1:9", "--json", check=False)
        assert no_dest.returncode == 1 and "destination agent" in no_dest.stderr
        refused = a.cli("vm", "destroy", "plain", check=False)
        assert refused.returncode == 2 and "--yes" in refused.stderr
        a.cli("vm", "destroy", "plain", "--yes")
        assert vm_names(a) == {}
        assert not (a.datastores["main"] / "plain").exists()
        # Without a token, or with a wrong one: refused, and the CLI says so.
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token\n")
        bad = AgentProc("x", tmp_path / "x", wrong, {}, url=a.url, ca_file=a.ca_file)
        exposed = bad.cli("vm", "list", check=False)  # a token file others may read is not used at all
        assert (
            exposed.returncode == 3 and "open to others" in exposed.stderr and "chmod 600" in exposed.stderr
        )
        wrong.chmod(0o600)
        denied = bad.cli("vm", "list", check=False)
        assert denied.returncode == 2 and "token" in denied.stderr
        gone = AgentProc("x", tmp_path / "x", a.token_file, {}, url="https://127.0.0.1:9", ca_file=a.ca_file)
        unreachable = gone.cli("vm", "list", check=False)
        assert unreachable.returncode == 3 and "does not answer" in unreachable.stderr


def test_agent_keeps_its_state_in_sqlite(tmp_path: Path) -> None:
    """A VM created through one agent process is known to the next (database and datastore agree)."""
    with agents(tmp_path, "solo") as (a,):
        a.cli("vm", "create", "kept", "--memory", "64", "--kernel", kernel(tmp_path), "--no-nic")
        a.stop()
        a.start()
        assert vm_names(a) == {"kept": "stopped"}
        rows = (
            sqlite3.connect(a.state_dir / "agent.sqlite3").execute("SELECT name, state FROM vms").fetchall()
        )
        assert rows == [("kept", "stopped")]
        assert Datastore.open(a.datastores["main"]).lookup("kept")[1].memory_mib == 64
        assert json.loads((a.state_dir / "agent.json").read_text())["url"] == a.url
