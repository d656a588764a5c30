"""Live migration of real TCG guests between two "hosts" on this machine (two datastores, two runtime
directories), driven through the `hikkoshi migrate` command."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.diskwriter import verify_diskwriter_image
from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.vm.datastore import Datastore
from tests.support.migrations import DONE, asyncio_request, cleanup, finish_and_verify, hosts, migrate
from tests.support.vms import (
    alive,
    console,
    guest,
    guest_vm,
    running,
    short_runtime_dir,
    stop,
    wait_console,
    wait_dead,
)

__all__ = ["guest", "hosts", "short_runtime_dir"]  # fixtures: the test guest, two hosts, A's runtime dir


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["hybrid", "postcopy", "precopy", "shared"])
def test_busy_guest_migrates(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path], storage: str
) -> None:
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 4, "mb": 24}
    home = guest_vm(
        a, guest, "mover", "busy", params, memory_mib=192, disks=[{"name": "disk0", "size": "32M"}]
    )
    dest = b.home("mover")
    with running(home) as info, cleanup(dest):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        wait_console(home, r"HIKKOSHI-MEMDIRTY READY")
        code, record = migrate(a, b, runtime_b, "mover", "--storage", storage)
        assert code == 0, record
        assert record["phase"] == "done", record
        report = record["report"]
        print(json.dumps(report, indent=1))
        assert report["downtime_ms"] > 0 and report["total_time_ms"] > 0 and report["memory_bytes"] > 0
        # The source's QEMU and services are gone; its files too unless the storage is shared.
        assert wait_dead([info["qemu_pid"]]) == []
        if storage == "shared":
            assert home.path.exists()
        else:
            assert wait_dead([info["supervisor_pid"], info["nbd_pid"]]) == []
            assert not home.path.exists()
            assert not (dest.path / "incoming.json").exists()
        assert dest.is_running()
        status = asyncio_request(dest, "status")
        assert status["state"] == "running"
        # The guest goes on writing on the destination, then verifies everything it wrote.
        mark = len(console(dest))
        wait_console(dest, rf"PROGRESS run={run} ", after=mark)
        if storage == "shared":
            stop(dest)
            text = console(dest)
            done = DONE.search(text)
            assert done is not None, text[-3000:]
            # the disk is still the source's file, served by the source host
            assert verify_diskwriter_image(home.path / "disk0.raw", run=run, durable=int(done[2]))
        else:
            finish_and_verify(dest, run)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["hybrid", "postcopy", "precopy", "shared"])
def test_idle_guest_migrates(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path], storage: str
) -> None:
    """An idle guest (its disk data written once by the host) in every mode: the destination serves
    the same disk bytes, and the guest answers on its console after the move."""
    a, b, runtime_b = hosts
    home = guest_vm(a, guest, "calm", "idle", memory_mib=128, disks=[{"name": "disk0", "size": "32M"}])
    pattern = random.randbytes(4 << 20)
    with (home.path / "disk0.raw").open("r+b") as f:
        f.seek(8 << 20)
        f.write(pattern)
    expected = (home.path / "disk0.raw").read_bytes()
    dest = b.home("calm")
    with running(home), cleanup(dest):
        wait_console(home, r"HIKKOSHI-IDLE READY")
        code, record = migrate(a, b, runtime_b, "calm", "--storage", storage)
        assert code == 0 and record["phase"] == "done", record
        report = record["report"]
        assert report["downtime_ms"] > 0 and report["switchover"]["storage_ms"] < 1000
        disk = (home if storage == "shared" else dest).path / "disk0.raw"
        assert disk.read_bytes() == expected
        assert asyncio_request(dest, "status")["state"] == "running"
        # The destination's disk device has the geometry the guest saw on the source (no guess there).
        device = "/machine/peripheral/vd-disk0"
        chs = [
            asyncio_request(dest, "qmp", execute="qom-get", arguments={"path": device, "property": p})
            for p in ("cyls", "heads", "secs")
        ]
        assert record["facts"]["geometry"] == {"disk0": chs} and min(chs) > 0
        assert ",cyls={},heads={},secs={}".format(*chs) in (dest.path / "qemu.log").read_text()
        stop(dest)


@pytest.mark.slow
def test_destination_dies_during_memory_copy_rolls_back(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path]
) -> None:
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 4, "mb": 24}
    home = guest_vm(
        a, guest, "stay", "busy", params, memory_mib=192, disks=[{"name": "disk0", "size": "32M"}]
    )
    dest = b.home("stay")

    records = a.path / ".hikkoshi" / "migrations"

    def kill_destination_qemu() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            phases = [json.loads(p.read_text())["phase"] for p in records.glob("*.json")]
            pid = dest.read_state().get("qemu_pid") if dest.path.exists() else None
            if pid and "memory-precopy" in phases:
                time.sleep(1.0)  # well into the copy (bandwidth-limited: it takes a while)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
                return
            time.sleep(0.02)

    with running(home) as info, cleanup(dest):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        killer = threading.Thread(target=kill_destination_qemu)
        killer.start()
        code, record = migrate(a, b, runtime_b, "stay", "--bandwidth", "20M")
        killer.join()
        assert code == 1, record
        assert record["phase"] == "rolled-back", record
        assert "memory" in record["error"] or "destination" in record["error"], record["error"]
        assert [p["phase"] for p in record["phases"]][-3:] == ["memory-precopy", "rollback", "rolled-back"]
        assert not dest.path.exists()
        assert asyncio_request(home, "status")["state"] == "running"
        assert alive(info["qemu_pid"])
        # The bitmap and extra listener of the attempt are gone from the source's NBD service.
        mark = len(console(home))
        wait_console(home, rf"PROGRESS run={run} ", after=mark)
        finish_and_verify(home, run)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash_at", "outcome"),
    [
        ("memory-precopy", "rolled-back"),
        ("switchover", "rolled-back"),
        ("resume-destination", "done"),
        ("storage-post", "done"),
    ],
)
def test_coordinator_dies_and_a_new_one_recovers(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path], crash_at: str, outcome: str
) -> None:
    """SIGKILL of the coordinator right after it recorded a phase; `migrations recover` then rolls
    back (before the commit point) or finishes (after it): the VM runs in exactly one place."""
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 2, "mb": 16}
    home = guest_vm(
        a, guest, "crashy", "busy", params, memory_mib=160, disks=[{"name": "disk0", "size": "32M"}]
    )
    dest = b.home("crashy")
    with running(home), cleanup(dest):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        migrate(a, b, runtime_b, "crashy", crash_at=f"migrate-{crash_at}")
        cmd = [
            sys.executable,
            "-m",
            "hikkoshi",
            "migrations",
            "recover",
            "--datastore",
            str(a.path),
            "--json",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["phase"] == outcome, record
        assert record["report"].get("recovered") is True
        live = dest if outcome == "done" else home
        gone = home if outcome == "done" else dest
        assert not gone.path.exists()
        assert asyncio_request(live, "status")["state"] == "running"
        mark = len(console(live))
        wait_console(live, rf"PROGRESS run={run} ", after=mark)
        finish_and_verify(live, run)


@pytest.mark.slow
def test_destination_disk_service_killed_after_switchover_is_restarted(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path]
) -> None:
    """The destination's disk service dies while the guest runs there and its disk is half relocated:
    the supervisor starts a new one, which carries on with the same cache; the guest runs on, the
    relocation completes and the disk becomes a plain file with nothing left beside it."""
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 2, "mb": 16}
    disks = [{"name": "disk0", "size": "48M"}]
    home = guest_vm(a, guest, "px", "busy", params, memory_mib=160, disks=disks)
    dest = b.home("px")
    with running(home), cleanup(dest):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        # Fill the disk beyond the guest's ring so the background copy has something to do.
        cmd = [sys.executable, "-m", "hikkoshi", "migrate", "px", "--datastore", str(a.path)]
        cmd += ["--to-datastore", str(b.path), "--to-runtime-dir", str(runtime_b), "--json"]
        cmd += ["--disk-bandwidth", "1M"]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            deadline = time.monotonic() + 120
            pid = None
            while time.monotonic() < deadline and pid is None:
                state = dest.read_state() if dest.path.exists() else {}
                if state.get("state") == "running" and state.get("nbd_pid"):
                    pid = int(state["nbd_pid"])
                time.sleep(0.05)
            assert pid is not None, "the destination never resumed"
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        record = json.loads(out)
        assert record["phase"] == "done"
        # The supervisor records the new service's pid once it serves: the migration's last step may
        # have been answered by it a moment before.
        deadline = time.monotonic() + 30
        while dest.read_state().get("nbd_pid") in (pid, None) and time.monotonic() < deadline:
            time.sleep(0.1)
        new_pid = dest.read_state()["nbd_pid"]
        assert new_pid not in (pid, None) and alive(int(new_pid))
        assert not (dest.path / "disk0.raw.bitmap").exists() and not dest.disk_plan_file.exists()
        # Requests that failed while no disk service was there may have stopped the guest (werror=stop);
        # its supervisor resumes it once the new one serves.
        deadline = time.monotonic() + 30
        while asyncio_request(dest, "status")["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert asyncio_request(dest, "status")["state"] == "running"
        mark = len(console(dest))
        wait_console(dest, rf"PROGRESS run={run} ", after=mark)
        finish_and_verify(dest, run)


@pytest.mark.slow
def test_migration_across_the_wan_emulator(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path]
) -> None:
    """Hybrid, with the memory stream and the disk export through one emulated 100 ms, 100 Mbit/s path."""
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 2, "mb": 16}
    home = guest_vm(a, guest, "far", "busy", params, memory_mib=160, disks=[{"name": "disk0", "size": "32M"}])
    dest = b.home("far")
    with running(home), cleanup(dest):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        code, record = migrate(a, b, runtime_b, "far", "--wan", "100ms,100Mbit")
        assert code == 0, record
        routes = record["facts"]["routes"]
        assert any(k.startswith("stream ") for k in routes) and any(k.startswith("export ") for k in routes)
        report = record["report"]
        # Everything crossed the emulated link: at 100 Mbit/s the memory alone takes its time.
        assert report["phases_s"]["memory-precopy"] >= report["memory_bytes"] * 8 / 100e6 * 0.8
        mark = len(console(dest))
        wait_console(dest, rf"PROGRESS run={run} ", after=mark)
        finish_and_verify(dest, run)


@pytest.mark.slow
def test_cut_migration_link_rolls_back(guest: GuestImage, hosts: tuple[Datastore, Datastore, Path]) -> None:
    """The memory stream's link is cut in the middle of the copy: QEMU's migration fails, the
    coordinator rolls back, the guest keeps running on the source with its data intact."""
    import asyncio

    from hikkoshi.lab.link_model import WanParams
    from hikkoshi.lab.wan import WanLink
    from hikkoshi.migrate.destination import LocalDestination
    from hikkoshi.migrate.job import MigrationError
    from hikkoshi.migrate.live import LiveMigration, LiveRequest
    from hikkoshi.migrate.record import MigrationStore

    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 2, "mb": 16}
    home = guest_vm(a, guest, "cut", "busy", params, memory_mib=160, disks=[{"name": "disk0", "size": "32M"}])
    dest = b.home("cut")

    async def scenario() -> str:
        links: list[WanLink] = []
        async with contextlib.AsyncExitStack() as stack:

            async def route(purpose: str, address: str) -> str:
                link = await stack.enter_async_context(WanLink(WanParams(1.0, 40e6), address))
                if purpose == "stream":
                    links.append(link)
                return f"127.0.0.1:{link.port}"

            request = LiveRequest(vm="cut", source_datastore=a.path, route=route)
            coordinator = LiveMigration(
                request,
                LocalDestination("cut", b.path, runtime_b),
                MigrationStore(a.path / ".hikkoshi" / "migrations"),
            )
            task = asyncio.create_task(coordinator.run())
            while not links or links[0].stats().up.bytes_in < 8 << 20:
                assert not task.done(), task
                await asyncio.sleep(0.05)
            await links[0].aclose()  # the cut: both ends see their connection reset
            with pytest.raises(MigrationError) as failed:
                await task
            return failed.value.record.phase.value

    with running(home) as info, cleanup(dest):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        assert asyncio.run(scenario()) == "rolled-back"
        assert not dest.path.exists()
        assert alive(info["qemu_pid"])
        assert asyncio_request(home, "status")["state"] == "running"
        mark = len(console(home))
        wait_console(home, rf"PROGRESS run={run} ", after=mark)
        finish_and_verify(home, run)


@pytest.mark.slow
def test_cold_migration(guest: GuestImage, hosts: tuple[Datastore, Datastore, Path]) -> None:
    """A powered-off VM: home files and disks (holes kept) move; the VM boots on the destination."""
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    home = guest_vm(a, guest, "cold", "diskwriter", {"run": run, "progress": 4, "scrub": 16})
    with running(home):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        last = finish_and_verify(home, run)
    source_disk = (home.path / "disk0.raw").read_bytes()
    code, record = migrate(a, b, runtime_b, "cold", "--offline")
    assert code == 0, record
    assert record["kind"] == "cold" and record["phase"] == "done"
    assert [p["phase"] for p in record["phases"]] == [
        "precheck", "prepare-destination", "home-files", "storage-pre", "cleanup", "done"
    ]  # fmt: skip
    dest = b.home("cold")
    assert not home.path.exists()
    disk = dest.path / "disk0.raw"
    assert disk.read_bytes() == source_disk
    assert disk.stat().st_blocks * 512 < disk.stat().st_size  # still sparse
    # It boots there and finds its earlier records.
    with running(dest, runtime_dir=runtime_b):
        wait_console(dest, rf"HIKKOSHI-DISKWRITER RESUME run={run} last={last} records=\d+ torn=0 OK")


@pytest.mark.slow
def test_cold_migration_refuses_a_running_vm(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path]
) -> None:
    a, b, runtime_b = hosts
    home = guest_vm(a, guest, "warm", "idle")
    with running(home):
        code, record = migrate(a, b, runtime_b, "warm", "--offline")
        assert code == 2 and "is running" in record["error"], record
        assert not b.home("warm").path.exists()


@pytest.mark.slow
def test_quick_migration(guest: GuestImage, hosts: tuple[Datastore, Datastore, Path]) -> None:
    """Suspend, move memory state and disks, resume: the guest goes on where it stopped."""
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 2, "mb": 16}
    home = guest_vm(
        a, guest, "quick", "busy", params, memory_mib=160, disks=[{"name": "disk0", "size": "32M"}]
    )
    dest = b.home("quick")
    with running(home) as info, cleanup(dest):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        code, record = migrate(a, b, runtime_b, "quick", "--quick")
        assert code == 0, record
        assert record["kind"] == "quick" and record["phase"] == "done"
        assert record["report"]["memory_bytes"] > 0 and record["report"]["downtime_ms"] > 0
        assert wait_dead([info["supervisor_pid"], info["qemu_pid"], info["nbd_pid"]]) == []
        assert not home.path.exists()
        assert not (dest.path / "memory.state").exists()
        mark = len(console(dest))
        wait_console(dest, rf"PROGRESS run={run} ", after=mark)
        finish_and_verify(dest, run)


@pytest.mark.slow
@pytest.mark.parametrize("auto_converge", [True, False])
def test_guest_dirtying_faster_than_the_link(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path], auto_converge: bool
) -> None:
    """The schedule raises the downtime limit step by step (on KVM), then throttles (auto-converge);
    without throttling it runs out of steps and aborts: the migration rolls back and the guest runs on."""
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 64, "mb": 24}
    home = guest_vm(a, guest, "hot", "busy", params, memory_mib=160, disks=[{"name": "disk0", "size": "32M"}])
    dest = b.home("hot")
    extra = ["--bandwidth", "12M", "--max-downtime", "100"]
    if not auto_converge:
        extra.append("--no-auto-converge")
    with running(home), cleanup(dest):
        wait_console(home, r"HIKKOSHI-MEMDIRTY READY")
        code, record = migrate(a, b, runtime_b, "hot", *extra)
        report = record["report"]
        actions = [x["action"] for x in report["actions"]]
        # The downtime limit rises first, except under TCG, where the schedule starts at the maximum (see
        # Coordinator._precheck): then throttling, or giving up, comes first.
        climbs = [] if report.get("schedule_note", "").startswith("tcg") else ["set-downtime", "set-downtime"]
        assert [a for a in actions if a == "set-downtime"] == climbs, report
        assert report["dirty_rate_mib_s"] > 0
        if auto_converge:
            # QEMU throttled the vCPUs as far as each step allowed; whether that is enough depends on
            # how much the guest still dirties: either end is fine, a half-done one is not.
            throttles = [i["throttle"] for i in report["iterations"]]
            assert "throttle" in actions and max(throttles) >= 20, report
            assert (code, record["phase"]) in ((0, "done"), (1, "rolled-back")), record
            live = dest if code == 0 else home
        else:
            assert code == 1 and record["phase"] == "rolled-back", record
            assert actions[-1] == "abort" and "throttle" not in actions
            assert "did not converge" in record["error"]
            live = home
        assert not (home if live is dest else dest).path.exists()
        mark = len(console(live))
        wait_console(live, rf"PROGRESS run={run} ", after=mark)
        finish_and_verify(live, run)


@pytest.mark.slow
def test_memory_stream_with_tls(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path], tmp_path: Path
) -> None:
    """--tls-dir: the stream between the two QEMUs is TLS (its first bytes are a TLS handshake record),
    both ends verified by one CA; the migration completes."""
    import asyncio

    from hikkoshi.identity.authority import issue_host, make_ca
    from hikkoshi.migrate.destination import LocalDestination
    from hikkoshi.migrate.live import LiveMigration, LiveRequest
    from hikkoshi.migrate.record import MigrationStore

    # One host identity, as `hikkoshi cluster init` and `cluster issue` make it, in QEMU's layout:
    # the host certificate serves both ends (server and client), as the agents hand it to QEMU.
    make_ca(tmp_path / "ca")
    ids = issue_host(tmp_path / "ca", "host-a", tmp_path / "id", ["127.0.0.1"])
    tls = tmp_path / "tls"
    tls.mkdir()
    for name, source in {
        "ca-cert.pem": ids.ca,
        "server-cert.pem": ids.cert,
        "server-key.pem": ids.key,
        "client-cert.pem": ids.cert,
        "client-key.pem": ids.key,
    }.items():
        (tls / name).write_bytes(source.read_bytes())
    a, b, runtime_b = hosts
    home = guest_vm(a, guest, "sealed", "idle")
    dest = b.home("sealed")
    first_bytes: list[bytes] = []

    async def scenario() -> str:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str) -> None:
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))

            async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, record: bool) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await r.read(65536):
                        if record and not first_bytes:
                            first_bytes.append(data[:3])
                        w.write(data)
                        await w.drain()
                w.close()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(pipe(reader, up_writer, True))
                tg.create_task(pipe(up_reader, writer, False))

        servers: list[asyncio.Server] = []

        async def route(purpose: str, address: str) -> str:
            if purpose != "stream":
                return address
            server = await asyncio.start_server(lambda r, w: relay(r, w, address), "127.0.0.1", 0)
            servers.append(server)
            return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

        request = LiveRequest(vm="sealed", source_datastore=a.path, route=route, tls_dir=tls)
        destination = LocalDestination("sealed", b.path, runtime_b, tls_dir=tls)
        try:
            store = MigrationStore(a.path / ".hikkoshi" / "migrations")
            record = await LiveMigration(request, destination, store).run()
        finally:
            for server in servers:
                server.close()
        return record.phase.value

    with running(home), cleanup(dest):
        wait_console(home, r"HIKKOSHI-IDLE READY")
        assert asyncio.run(scenario()) == "done"
        assert first_bytes and first_bytes[0][0] == 0x16 and first_bytes[0][1] == 0x03  # TLS handshake
        assert asyncio_request(dest, "status")["state"] == "running"
        stop(dest)


@pytest.mark.slow
def test_destination_dies_during_post_copy(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path]
) -> None:
    """The destination's QEMU dies after the commit point while its disk is still being pulled: the
    source never runs again and keeps its disk and serves it; the migration waits. Started again on the
    destination, the VM boots with its relocation carrying on, the guest finds every record it had
    flushed, and the migration, taken up again, completes and releases the source."""
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    home = guest_vm(a, guest, "fragile", "diskwriter", {"run": run, "progress": 2, "scrub": 16})
    dest = b.home("fragile")
    with running(home) as info, cleanup(dest):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        cmd = [sys.executable, "-m", "hikkoshi", "migrate", "fragile", "--datastore", str(a.path)]
        cmd += ["--to-datastore", str(b.path), "--to-runtime-dir", str(runtime_b), "--json"]
        cmd += ["--disk-bandwidth", "256K"]  # the 8 MiB ring takes half a minute to pull
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                state = dest.read_state() if dest.path.exists() else {}
                if state.get("state") == "running":
                    break
                time.sleep(0.05)
            mark = len(console(dest))
            wait_console(dest, rf"PROGRESS run={run} ", after=mark)  # it wrote on the destination
            os.kill(int(state["qemu_pid"]), signal.SIGKILL)
            out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        record = json.loads(out)
        assert record["phase"] == "storage-post" and "source keeps serving" in record["error"], record
        # The source: QEMU gone for good, disk kept and served; nothing deleted.
        assert wait_dead([info["qemu_pid"]]) == []
        assert home.is_running() and home.read_state()["state"] == "serving"
        assert (home.path / "disk0.raw").exists() and dest.disk_plan_file.exists()
        durable = max(int(m) for m in re.findall(rf"PROGRESS run={run} durable=(\d+)", console(dest)))
        control.start_vm(dest, runtime_dir=runtime_b)
        wait_console(dest, rf"HIKKOSHI-DISKWRITER RESUME run={run} last=(\d+) records=\d+ torn=\d OK")
        resumed = re.search(rf"RESUME run={run} last=(\d+)", console(dest))
        assert resumed is not None and int(resumed[1]) >= durable
        # Taken up again, the migration completes: the disk is the destination's, the source goes.
        recover = [sys.executable, "-m", "hikkoshi", "migrations", "recover", "--datastore", str(a.path)]
        done = subprocess.run([*recover, "--json"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["phase"] == "done"
        assert not home.path.exists() and not dest.disk_plan_file.exists()
        finish_and_verify(dest, run)


@pytest.mark.slow
def test_postcopy_ram_when_allowed(guest: GuestImage, hosts: tuple[Datastore, Datastore, Path]) -> None:
    """A guest that out-dirties the link, no throttling, post-copy allowed: the schedule switches QEMU
    to post-copy RAM, which always finishes; the guest's data verifies on the destination."""
    a, b, runtime_b = hosts
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 64, "mb": 24}
    home = guest_vm(a, guest, "pc", "busy", params, memory_mib=160, disks=[{"name": "disk0", "size": "32M"}])
    dest = b.home("pc")
    with running(home), cleanup(dest):
        wait_console(home, r"HIKKOSHI-MEMDIRTY READY")
        extra = ["--bandwidth", "12M", "--max-downtime", "100", "--no-auto-converge", "--allow-postcopy"]
        code, record = migrate(a, b, runtime_b, "pc", *extra)
        actions = [x["action"] for x in record["report"]["actions"]]
        assert code == 0 and record["phase"] == "done", record
        assert actions[-1] == "postcopy", actions
        mark = len(console(dest))
        wait_console(dest, rf"PROGRESS run={run} ", after=mark)
        finish_and_verify(dest, run)
