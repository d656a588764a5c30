"""Real VMs under QEMU (TCG here): start, pause, resume, stop, restart, with disks through our NBD service.

Every VM is started through its supervisor, as ``hikkoshi vm start`` does, and every process is
checked dead (and killed by pid if not) when a test ends.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from hikkoshi.daemons import supervisor_client as control
from hikkoshi.daemons.supervisor import MAX_DISK_RESTARTS
from hikkoshi.guest.diskwriter import console_durable, verify_diskwriter_image
from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.guest.memdirty import memdirty_reports
from hikkoshi.guest.tcpservice import TcpServiceClient
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.errors import RuntimeStateError, VmStartError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import host_facts
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.spec import parse_spec, spec_to_toml
from tests.support import vms
from tests.support.vms import alive, console, guest_vm, request, running, stop, wait_console, wait_dead

# Fixtures, by assignment so that the tests' parameters do not shadow imported names.
guest = vms.guest
store = vms.store
short_runtime_dir = vms.short_runtime_dir

_DONE = r"HIKKOSHI-DISKWRITER DONE run=(\d+) last=(\d+) written=(\d+) records=(\d+) OK"


@pytest.mark.slow
def test_diskwriter_vm_stops_restarts_and_verifies(store: Datastore, guest: GuestImage) -> None:
    run = random.randrange(1, 2**31)  # names this test's records: stale data cannot pass
    home = guest_vm(store, guest, "writer", "diskwriter", {"run": run, "progress": 4, "scrub": 16})
    disk = home.path / "disk0.raw"

    with running(home) as info:
        assert info["accel"] in ("tcg", "kvm")
        pids = [info["supervisor_pid"], info["qemu_pid"], info["nbd_pid"]]
        assert all(alive(p) for p in pids)
        assert Path(info["nbd_socket"]).is_socket()
        wait_console(home, rf"PROGRESS run={run} durable=(1[1-9]|[2-9]\d|\d{{3,}}) ")

        assert request(home, "pause")["state"] == "paused"
        assert request(home, "status")["state"] == "paused"
        assert request(home, "resume")["state"] == "running"
        mark = len(console(home))
        wait_console(home, rf"PROGRESS run={run} ", after=mark)  # writing goes on after the pause

        state = stop(home)
        assert state["exit"]["how"] == "acpi" and state["exit"]["returncode"] == 0
        assert wait_dead(pids) == []
        assert not RunDir.for_vm(home.load_spec().uuid).path.exists()

    first = console(home)
    done = re.search(_DONE, first)
    assert done is not None, first[-3000:]
    last = int(done[2])
    assert console_durable(first, run) == last
    report = verify_diskwriter_image(disk, run=run, durable=last)
    assert report.last == last and not report.torn

    # Second boot: the guest checks the first boot's records itself, then writes on.
    with running(home):
        wait_console(home, rf"HIKKOSHI-DISKWRITER RESUME run={run} last={last} records=\d+ torn=0 OK")
        wait_console(home, rf"READY run={run} next={last + 1} ")
        wait_console(home, rf"PROGRESS run={run} durable=({last + 4}|{last + 8}|\d{{{len(str(last)) + 1},}})")
        assert stop(home)["exit"]["how"] == "acpi"
    second = console(home)
    done = re.search(_DONE, second)
    assert done is not None, second[-3000:]
    assert int(done[2]) > last
    assert verify_diskwriter_image(disk, run=run, durable=int(done[2])).last == int(done[2])
    assert re.search(_DONE, (home.path / "console.log.1").read_text()) is not None  # the first boot's


@pytest.mark.slow
def test_guest_power_off_ends_the_supervisor(store: Datastore, guest: GuestImage) -> None:
    home = guest_vm(store, guest, "short", "diskwriter", {"run": 9, "records": 3, "progress": 1})
    with running(home) as info:
        assert control.wait_stopped(home, 120)
        assert wait_dead([info["qemu_pid"], info["nbd_pid"], info["supervisor_pid"]]) == []
    state = home.read_state()
    assert state["state"] == "stopped"
    assert state["exit"]["how"] == "guest" and state["exit"]["returncode"] == 0
    assert "HIKKOSHI-DISKWRITER DONE run=9 last=2 written=3 records=3 OK" in console(home)
    assert verify_diskwriter_image(home.path / "disk0.raw", run=9, durable=2).last == 2


@pytest.mark.slow
def test_killed_supervisor_takes_qemu_and_nbd_along(store: Datastore, guest: GuestImage) -> None:
    home = guest_vm(store, guest, "orphan", "idle")
    with running(home) as info:
        wait_console(home, "HIKKOSHI-IDLE READY")
        with pytest.raises(RuntimeStateError, match="running already"):
            control.start_vm(home)
        os.kill(info["supervisor_pid"], signal.SIGKILL)
        # Parent-death signal: nothing the supervisor owned survives it.
        assert wait_dead([info["qemu_pid"], info["nbd_pid"]]) == []
        assert control.wait_stopped(home, 10)
    # A new start cleans up after the dead one (runtime directory, sockets) and works.
    with running(home):
        wait_console(home, "HIKKOSHI-IDLE READY")
        state = stop(home, hard=True)
        assert state["exit"]["how"] == "quit"


@pytest.mark.slow
def test_tcp_connection_to_the_guest_survives_pause(store: Datastore, guest: GuestImage) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = guest_vm(
        store,
        guest,
        "tcp",
        "tcpservice",
        disks=[],
        nics=[{"forwards": [{"host_port": port, "guest_port": 7777}]}],
    )
    with running(home) as info:
        assert info["nbd_pid"] is None  # no disks, no NBD service
        ready = wait_console(home, r"HIKKOSHI-TCPSERVICE READY port=7777 ip=10.0.2.15/24 boot=(\S+)")
        with TcpServiceClient("127.0.0.1", port) as client:
            assert client.boot == ready[1]
            for i in range(5):
                client.echo(f"before {i}")
            request(home, "pause")
            request(home, "resume")
            for i in range(5):
                client.echo(f"after {i}")
            assert client.count == 10
        stop(home)


@pytest.mark.slow
def test_memdirty_dirties_memory_at_about_its_rate(store: Datastore, guest: GuestImage) -> None:
    rate, working_set = 8, 64
    home = guest_vm(
        store, guest, "dirty", "memdirty", {"rate": rate, "mb": working_set, "report": 2}, disks=[]
    )
    with running(home):
        wait_console(home, f"HIKKOSHI-MEMDIRTY READY rate={rate} mb={working_set}")
        wait_console(home, "HIKKOSHI-MEMDIRTY PROGRESS")
        # QEMU's own estimate: page sampling hashes pages at the start and the end of the window.
        # 3 s at 8 MiB/s stays below the 64 MiB working set, so every rewrite counts.
        request(home, "qmp", execute="calc-dirty-rate", arguments={"calc-time": 3, "sample-pages": 4096})
        measured = None
        for _ in range(100):
            result = request(home, "qmp", execute="query-dirty-rate")
            if result["status"] == "measured":
                measured = result["dirty-rate"]
                break
            time.sleep(0.2)
        state = stop(home)
    reports = memdirty_reports(console(home))
    guest_report = reports[-1] if reports else None
    print(f"memdirty: target {rate} MiB/s, QEMU measured {measured} MiB/s, guest {guest_report}")
    assert reports and reports[-1].kind == "DONE"
    assert state["exit"]["how"] == "acpi"
    assert measured is not None
    # A wide band: this checks that the workload dirties memory at about the rate asked, not how
    # fast a shared TCG machine is. The guest never writes faster than the rate.
    assert rate / 4 <= measured <= rate * 3
    assert reports[-1].rate <= rate * 1.1


def test_bad_specs_are_refused_at_start(store: Datastore, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"not really a kernel")
    home = store.create_vm(
        parse_spec(
            {
                "name": "bad",
                "memory_mib": 64,
                "disks": [{"name": "d", "size": "1M"}],
                "boot": {"kernel": str(kernel)},
            }
        ),
        host_facts(),
    )
    kernel.unlink()
    with pytest.raises(
        VmStartError, match=rf"cannot start VM 'bad':\n  boot.kernel: {kernel} does not exist"
    ):
        control.start_vm(home, timeout=60)
    assert not home.is_running()
    state = home.read_state()
    assert state["state"] == "stopped" and "does not exist" in state["error"]

    # More memory than the host has available (written straight into vm.toml, past create's check).
    kernel.write_bytes(b"k")
    spec = home.load_spec()
    available_mib = host_facts().memory.available >> 20
    home.spec_file.write_text(spec_to_toml(spec.model_copy(update={"memory_mib": available_mib + 1024})))
    with pytest.raises(
        VmStartError, match=r"memory_mib: \d+ MiB \(\+128 MiB for QEMU\) is more than this host"
    ):
        control.start_vm(home, timeout=60)

    # A spec that no longer validates.
    home.spec_file.write_text(home.spec_file.read_text().replace("memory_mib", "memory"))
    with pytest.raises(VmStartError, match=r"invalid VM spec in .*vm.toml:\n  memory_mib: is required"):
        control.start_vm(home, timeout=60)
    assert not home.is_running()
    assert json.loads(home.state_file.read_text())["state"] == "stopped"


def _next_disk_service(home: VmHome, old: int, timeout: float = 30.0) -> int:
    """The pid of the disk service the supervisor started after ``old`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = request(home, "status")
        if status["nbd_pid"] not in (None, old) and status["nbd_running"]:
            return int(status["nbd_pid"])
        time.sleep(0.05)
    raise AssertionError(f"no new disk service after {old}: {request(home, 'status')}")


@pytest.mark.slow
def test_disk_service_death_is_survived_and_flushed_records_stay(store: Datastore, guest: GuestImage) -> None:
    """The disk service is killed under a writing guest: the supervisor starts it again, QEMU reconnects
    (a request that failed meanwhile is retried by resuming the guest), the guest writes on, and every
    record it saw flushed verifies; a disk service that keeps dying is given up and the guest paused."""
    home = guest_vm(store, guest, "crash", "diskwriter", {"run": 77, "progress": 2})
    with running(home) as info:
        wait_console(home, r"PROGRESS run=77 durable=([5-9]|\d\d+) ")
        pid = info["nbd_pid"]
        os.kill(pid, signal.SIGKILL)
        pid = _next_disk_service(home, pid)
        mark = len(console(home))
        wait_console(home, r"PROGRESS run=77 durable=\d+ ", after=mark)  # the guest writes on
        assert request(home, "status")["state"] == "running"
        # Again and again: past its bound the supervisor stops restarting it and pauses the guest.
        while True:
            restarted = request(home, "status")["disk_restarts"]  # before this death
            os.kill(pid, signal.SIGKILL)
            if restarted >= MAX_DISK_RESTARTS:
                break  # this one is not started again
            pid = _next_disk_service(home, pid)
        for _ in range(400):
            status = request(home, "status")
            if status["state"] in ("paused", "io-error") and status["error"]:
                break
            time.sleep(0.05)
        assert status["state"] in ("paused", "io-error") and not status["nbd_running"]
        assert "the disk service ended" in status["error"]
        assert stop(home)["exit"]["how"] == "quit"  # a paused guest cannot take the power button
    durable = console_durable(console(home), 77)
    assert durable is not None
    # Cut off mid-write: every record the guest saw flushed is on the disk, at most one is torn.
    report = verify_diskwriter_image(home.path / "disk0.raw", run=77, durable=durable, allow_torn=True)
    with running(home):
        resumed = wait_console(
            home, r"HIKKOSHI-DISKWRITER RESUME run=77 last=(\d+) records=\d+ torn=([01]) OK"
        )
        assert int(resumed[1]) == report.last and int(resumed[2]) == int(report.torn)
        stop(home)


def test_qemu_failing_at_start_is_reported_and_cleaned_up(store: Datastore, guest: GuestImage) -> None:
    home = guest_vm(store, guest, "nomachine", "idle", machine="no-such-machine")
    with pytest.raises(VmStartError, match=r"QEMU exited at start:\n.*no-such-machine"):
        control.start_vm(home, timeout=60)
    assert not home.is_running()
    assert not RunDir.for_vm(home.load_spec().uuid).path.exists()
    state = home.read_state()
    assert state["state"] == "stopped" and "QEMU exited at start" in state["error"]
    # The disk service it had started is gone too.
    lines = home.supervisor_log.read_text().splitlines()
    pid_line = [line for line in lines if "started disk-service (pid" in line][-1]
    nbd_pid = int(pid_line.split("started disk-service (pid ")[1].split(")")[0])
    assert wait_dead([nbd_pid]) == []
