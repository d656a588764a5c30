"""Guest workloads without a guest: host-side verifiers and parsers, and the scripts under busybox."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hikkoshi.guest.ddbench import ddbench_results
from hikkoshi.guest.diskwriter import (
    PAYLOAD_SIZE,
    RECORD_SIZE,
    DiskwriterError,
    console_durable,
    diskwriter_record,
    verify_diskwriter_image,
)
from hikkoshi.guest.guest_lib import LIB_SCRIPT
from hikkoshi.guest.memdirty import memdirty_reports
from hikkoshi.guest.tcpservice import TcpServiceClient, TcpServiceError
from hikkoshi.guest.workloads import GUEST_FILES, INIT_SCRIPT, READY_TAGS, WORKLOADS

SLOTS = 8
RUN = 4242


def write_ring(path: Path, records: int, *, run: int = RUN, slots: int = SLOTS, extra: int = 1 << 20) -> None:
    """A disk as the guest leaves it after writing records 0 .. records-1."""
    with path.open("wb") as f:
        f.truncate(slots * RECORD_SIZE + extra)
        for seq in range(records):
            f.seek((seq % slots) * RECORD_SIZE)
            f.write(diskwriter_record(run, seq, slots, os.urandom(PAYLOAD_SIZE)))


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: Path, offset: int) -> None:
    """Damage one byte for sure (writing a fixed value is a no-op when the byte already holds it)."""
    with path.open("r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF]))


# --- diskwriter -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("records", [0, 1, 5, SLOTS, SLOTS + 3, 5 * SLOTS + 1])
def test_clean_rings_verify(tmp_path: Path, records: int) -> None:
    image = tmp_path / "disk.raw"
    write_ring(image, records)
    report = verify_diskwriter_image(image, run=RUN, slots=SLOTS, durable=records - 1 if records else None)
    assert report.last == (records - 1 if records else None)
    assert report.records == min(records, SLOTS)
    assert not report.torn


def test_other_runs_are_not_ours(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_ring(image, 3, run=1)
    assert verify_diskwriter_image(image, run=2, slots=SLOTS).last is None
    with pytest.raises(DiskwriterError, match="reported durable"):
        verify_diskwriter_image(image, run=2, slots=SLOTS, durable=0)


def test_damaged_payload(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_ring(image, 6)
    flip(image, 2 * RECORD_SIZE + 9000)
    with pytest.raises(DiskwriterError, match="seq=2 fails its checksum") as err:
        verify_diskwriter_image(image, run=RUN, slots=SLOTS)
    assert err.value.slot == 2


def test_torn_last_record_only_when_allowed(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_ring(image, SLOTS + 2)  # last = 9, in slot 1; slot 2 holds record 2
    # The guest was cut off writing record 10 into slot 2: new header, old payload.
    torn = diskwriter_record(RUN, SLOTS + 2, SLOTS, os.urandom(PAYLOAD_SIZE))
    patch(image, 2 * RECORD_SIZE, torn[:512])
    with pytest.raises(DiskwriterError, match="fails its checksum"):
        verify_diskwriter_image(image, run=RUN, slots=SLOTS)
    report = verify_diskwriter_image(image, run=RUN, slots=SLOTS, allow_torn=True, durable=SLOTS + 1)
    assert report.torn and report.last == SLOTS + 1 and report.records == SLOTS - 1
    # Torn anywhere but right after the last record is damage, allowed or not.
    flip(image, 5 * RECORD_SIZE + 300)
    with pytest.raises(DiskwriterError):
        verify_diskwriter_image(image, run=RUN, slots=SLOTS, allow_torn=True)


def test_lost_write_is_found(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_ring(image, SLOTS + 4)  # slot 1 holds record 9
    # As if the write of record 9 never reached the disk: slot 1 still holds record 1.
    patch(image, RECORD_SIZE, diskwriter_record(RUN, 1, SLOTS, os.urandom(PAYLOAD_SIZE)))
    with pytest.raises(DiskwriterError, match="holds 1 instead of record 9") as err:
        verify_diskwriter_image(image, run=RUN, slots=SLOTS)
    assert err.value.slot == 1


def test_lost_tail_is_found_by_durable(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_ring(image, 5)
    with pytest.raises(DiskwriterError, match="record 6 was reported durable but the last on disk is 4"):
        verify_diskwriter_image(image, run=RUN, slots=SLOTS, durable=6)


def test_misplaced_record(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_ring(image, 6)
    with image.open("r+b") as f:
        f.seek(4 * RECORD_SIZE)
        record = f.read(RECORD_SIZE)
        f.seek(6 * RECORD_SIZE)
        f.write(record)  # record 4 copied to slot 6 as well
    with pytest.raises(DiskwriterError, match="misplaced") as err:
        verify_diskwriter_image(image, run=RUN, slots=SLOTS)
    assert err.value.slot == 6


def test_short_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(3 * RECORD_SIZE))
    with pytest.raises(DiskwriterError, match="image ends inside the ring"):
        verify_diskwriter_image(image, run=RUN, slots=SLOTS)


def test_console_durable() -> None:
    console = (
        "HIKKOSHI-DISKWRITER READY run=5 next=0 slots=8\r\n"
        "HIKKOSHI-DISKWRITER PROGRESS run=5 durable=7 written=8 kbps=300\r\n"
        "HIKKOSHI-DISKWRITER PROGRESS run=6 durable=99 written=8 kbps=300\r\n"
        "HIKKOSHI-DISKWRITER DONE run=5 last=9 written=10 records=8 OK\r\n"
    )
    assert console_durable(console, 5) == 9
    assert console_durable(console, 6) == 99
    assert console_durable("HIKKOSHI-DISKWRITER DONE run=5 last=-1 written=0 records=0 OK", 5) is None


def test_memdirty_reports() -> None:
    console = (
        "HIKKOSHI-MEMDIRTY READY rate=10 mb=64\n"
        "HIKKOSHI-MEMDIRTY PROGRESS mib=50 seconds=5.01 rate=9.98\n"
        "HIKKOSHI-MEMDIRTY DONE mib=70 seconds=7.00 rate=10.00\n"
    )
    reports = memdirty_reports(console)
    assert [(r.kind, r.mib, r.rate) for r in reports] == [("PROGRESS", 50, 9.98), ("DONE", 70, 10.0)]


# --- the scripts, under the host's busybox ---------------------------------------------------------------


BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed")


def sh(script: str, tmp_path: Path) -> str:
    assert BUSYBOX is not None
    lib = tmp_path / "lib.sh"
    lib.write_text(LIB_SCRIPT)
    out = subprocess.run(
        [BUSYBOX, "sh", "-c", f". {lib}\n{script}"], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout


@needs_busybox
def test_every_guest_script_parses(tmp_path: Path) -> None:
    assert BUSYBOX is not None
    scripts = {"init": INIT_SCRIPT, **{f"lib/{k}": v for k, v in GUEST_FILES.items()}}
    for name, workload in WORKLOADS.items():
        scripts[f"workloads/{name}"] = workload.script
        scripts.update({f"files/{k}": v for k, v in workload.files.items() if not k.endswith(".awk")})
    for name, text in scripts.items():
        path = tmp_path / name.replace("/", "_")
        path.write_text(text)
        proc = subprocess.run([BUSYBOX, "sh", "-n", str(path)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    assert set(READY_TAGS) <= set(WORKLOADS)


@needs_busybox
def test_lib_helpers(tmp_path: Path) -> None:
    out = sh(
        "decimal a 000120; decimal b 0; decimal c 0000; echo $a $b $c\n"
        "is_number 1234567890 && echo ok1; is_number 12345678901 || echo long; is_number 1x || echo nan\n"
        "is_number '' || echo empty\n"
        "uptime_cs; t=$UPTIME_CS; case $t in *[!0-9]*) echo bad;; *) echo num;; esac\n"
        "read -r up _ < /proc/uptime; echo $(( ${up%.*} - t / 100 ))\n"
        "trap 'echo trapped' USR1; (sleep 0.2; kill -USR1 $$) & nap 20; echo after-nap\n",
        tmp_path,
    )
    lines = out.split("\n")
    assert lines[:5] == ["120 0 0", "ok1", "long", "nan", "empty"]
    assert lines[5] == "num"
    assert lines[6] in ("0", "1")
    # nap lets the trap run at once instead of after 20 s.
    assert lines[7:9] == ["trapped", "after-nap"]


# --- tcpservice client ------------------------------------------------------------------------------------


@pytest.fixture
def fake_service() -> Iterator[Callable[[Callable[[str, int], str]], int]]:
    """A one-connection server speaking tcpservice; its answers can be bent for the test."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(answer: Callable[[str, int], str]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rwb", buffering=0) as f:
                f.write(b"HELLO boot=abc-123 pid=7\n")
                for n, raw in enumerate(f, 1):
                    f.write(answer(raw.decode().rstrip("\n"), n).encode() + b"\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(timeout=5)


def test_tcpservice_client(fake_service: Callable[[Callable[[str, int], str]], int]) -> None:
    port = fake_service(lambda line, n: f"ECHO {n} {line}")
    with TcpServiceClient("127.0.0.1", port, timeout=5) as client:
        assert client.boot == "abc-123"
        assert [client.echo(f"line {i}  with spaces") for i in range(3)] == [1, 2, 3]
        with pytest.raises(ValueError):
            client.echo("two\nlines")


def test_tcpservice_client_catches_a_restarted_count(
    fake_service: Callable[[Callable[[str, int], str]], int],
) -> None:
    port = fake_service(lambda line, n: f"ECHO {1 if n == 3 else n} {line}")
    with TcpServiceClient("127.0.0.1", port, timeout=5) as client:
        client.echo("a")
        client.echo("b")
        with pytest.raises(TcpServiceError, match="expected 'ECHO 3 c', got 'ECHO 1 c'"):
            client.echo("c")


def test_ddbench_results() -> None:
    console = (
        "HIKKOSHI-DDBENCH READY dev=/dev/vda mib=64 bs_kib=1024\n"
        "HIKKOSHI-DDBENCH RESULT round=1 mib=64 write_cs=50 read_mib=256 read_cs=20\r\n"
        "HIKKOSHI-DDBENCH DONE\n"
    )
    (result,) = ddbench_results(console)
    assert (result.write_mib_s, result.read_mib_s) == (128.0, 1280.0)
