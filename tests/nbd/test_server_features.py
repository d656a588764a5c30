"""Server features seen from outside: several exports, Unix sockets, exact listen addresses, SIGTERM,
the control socket and its statistics, and clear errors for bad command lines."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.nbd.client import NbdClient
from hikkoshi.nbd.control import ControlError, control_request
from hikkoshi.nbd.errors import CommandError
from tests.support.images import make_image
from tests.support.servers import Served, hikkoshi_server, stop
from tests.support.servers import run_tool as run

MiB = 1 << 20
SIZE = 64 * MiB

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "nbdinfo", "fio")),
    reason="needs qemu-utils, libnbd-bin and fio",
)


def hikkoshi(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the hikkoshi CLI to completion."""
    return subprocess.run(
        [sys.executable, "-m", "hikkoshi", *args], capture_output=True, text=True, timeout=timeout
    )


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def control(served: Served, command: str, **args: Any) -> Any:
    assert served.control is not None
    return asyncio.run(control_request(served.control, command, **args))


def export_stats(served: Served, name: str = "disk") -> dict[str, Any]:
    result: dict[str, Any] = control(served, "stats", regions=True)[name]
    return result


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for Unix sockets (108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="hk", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- listening sockets of a process, from /proc ----------------------------------------------------------


def _decode(hex_addr: str) -> tuple[str, int]:
    host_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(host_hex)
    if len(raw) == 4:
        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four host-order 32-bit words
        host = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return host, int(port_hex, 16)


def listening(pid: int) -> set[tuple[str, str, int]]:
    """(proto, host, port) of every listening TCP socket the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for proto in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{proto}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # TCP_LISTEN
                    out.add((proto, *_decode(fields[1])))
    return out


# --- several exports -------------------------------------------------------------------------------------


@pytest.fixture
def multi(tmp_path: Path) -> Iterator[tuple[Served, list[Path]]]:
    images = [
        make_image(tmp_path / "a.raw", 16 * MiB, seed=1),
        make_image(tmp_path / "b.raw", 24 * MiB, seed=2, data_every=2 * MiB),
        make_image(tmp_path / "c.raw", 8 * MiB, seed=3),
    ]
    args = [*map(str, images), "--export", "alpha", "--export", "beta"]  # c.raw keeps its file name
    with hikkoshi_server(*args, "--control", f"unix:{tmp_path / 'ctl.sock'}") as s:
        yield s, images


def test_several_exports_serve_their_own_images(multi: tuple[Served, list[Path]]) -> None:
    served, (a, b, c) = multi
    for name, img in (("alpha", a), ("beta", b), ("c.raw", c)):
        uri = served.export_uri(name)
        info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
        assert info["virtual-size"] == img.stat().st_size
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), uri)
    # Distinct contents: export alpha is not image b.
    proc = run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", str(b), served.export_uri("alpha"), check=False
    )
    assert proc.returncode == 1
    # The empty name is the first export.
    assert json.loads(run("nbdinfo", "--json", served.uri).stdout)["exports"][0]["export-size"] == 16 * MiB


def test_writes_go_to_the_named_export_only(multi: tuple[Served, list[Path]]) -> None:
    served, (a, b, c) = multi
    before_a, before_c = a.read_bytes(), c.read_bytes()
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 64k", served.export_uri("beta"))
    assert file_bytes(b, MiB, 65536) == b"\x77" * 65536
    assert a.read_bytes() == before_a
    assert c.read_bytes() == before_c
    s = control(served, "stats")
    assert s["beta"]["bytes_written"] == 65536
    assert s["alpha"]["bytes_written"] == 0
    exports = {e["name"]: e for e in control(served, "exports")}
    assert set(exports) == {"alpha", "beta", "c.raw"}
    assert exports["beta"]["size"] == 24 * MiB
    assert exports["beta"]["read_only"] is False


def test_unknown_export_is_refused(multi: tuple[Served, list[Path]]) -> None:
    served, _ = multi
    proc = run("nbdinfo", served.export_uri("nosuch"), check=False)
    assert proc.returncode != 0
    assert "nosuch" in proc.stderr
    proc = run("qemu-img", "info", served.export_uri("nosuch"), check=False)
    assert proc.returncode != 0
    # The server goes on serving the others.
    run("nbdinfo", "--size", served.export_uri("beta"))


def test_export_names_with_odd_characters(tmp_path: Path) -> None:
    img = make_image(tmp_path / "x.raw", 4 * MiB)
    with hikkoshi_server(str(img), "--export", "vm 1/disk-0") as s:
        proc = run("nbdinfo", "--json", s.uri.rstrip("/") + "/vm%201/disk-0")
    assert json.loads(proc.stdout)["exports"][0]["export-name"] == "vm 1/disk-0"


# --- Unix sockets and exact addresses --------------------------------------------------------------------


def test_unix_socket(image: Path, short_dir: Path) -> None:
    sock = short_dir / "nbd.sock"
    with hikkoshi_server(str(image), "--export", "disk", "--listen", f"unix:{sock}") as s:
        assert s.uri == f"nbd+unix:///?socket={sock}"
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert not listening(s.pid)  # no TCP socket at all
        uri = f"nbd+unix:///disk?socket={sock}"
        info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
        assert info["virtual-size"] == SIZE
        run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 5M 4k", "-c", "read -P 0x3c 5M 4k", uri)
        assert file_bytes(image, 5 * MiB, 4096) == b"\x3c" * 4096
        assert run("nbdinfo", "--size", uri).stdout.strip() == str(SIZE)
    assert not sock.exists()  # removed on shutdown


def test_unix_socket_and_tcp_together(image: Path, short_dir: Path) -> None:
    sock = short_dir / "nbd.sock"
    with hikkoshi_server(
        str(image), "--export", "disk", "--listen", f"unix:{sock}", "--listen", "127.0.0.1:0"
    ) as s:
        assert s.uri.startswith("nbd+unix://")  # the first line printed
        (tcp,) = listening(s.pid)
        assert tcp[:2] == ("tcp", "127.0.0.1")
        run("nbdinfo", "--size", f"nbd://127.0.0.1:{tcp[2]}/disk")
        run("nbdinfo", "--size", f"nbd+unix:///disk?socket={sock}")


def test_listens_on_exactly_the_given_address(image: Path) -> None:
    with hikkoshi_server(str(image), "--export", "disk", "--listen", "127.0.0.1:0") as s:
        assert s.uri == f"nbd://127.0.0.1:{s.port}/"
        assert listening(s.pid) == {("tcp", "127.0.0.1", s.port)}


def test_listens_on_another_loopback_address_only(image: Path) -> None:
    # 127.0.0.2 is loopback too on Linux; binding there must not also bind 127.0.0.1 or 0.0.0.0.
    with hikkoshi_server(str(image), "--export", "disk", "--listen", "127.0.0.2:0") as s:
        assert s.port is not None
        assert listening(s.pid) == {("tcp", "127.0.0.2", s.port)}
        run("nbdinfo", "--size", f"nbd://127.0.0.2:{s.port}/disk")
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", s.port), timeout=5),
        ):
            pass


def _netns_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        probe = subprocess.run(
            ["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the process's stdout, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output from {proc.args!r} within {timeout}s")
    return proc.stdout.readline()


@pytest.mark.skipif(not _netns_available(), reason="needs unshare -rn (user + network namespaces)")
def test_default_listen_is_loopback_10809(image: Path) -> None:
    # Run without --listen inside a private network namespace, so port 10809 cannot clash with anything.
    cmd = [
        "unshare",
        "-rn",
        "sh",
        "-c",
        'ip link set lo up && exec "$0" -m hikkoshi nbd serve "$1" --export disk',
        sys.executable,
        str(image),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _readline(proc, timeout=20)  # the server prints once it listens
        assert line.strip() == "hikkoshi: serving nbd://127.0.0.1:10809/", line
        assert listening(proc.pid) == {("tcp", "127.0.0.1", 10809)}
        # And it serves there (nsenter joins the namespace of the server's pid).
        if shutil.which("nsenter"):
            size = run(
                "nsenter",
                "-t",
                str(proc.pid),
                "-U",
                "-n",
                "--preserve-credentials",
                "nbdinfo",
                "--size",
                "nbd://127.0.0.1:10809/disk",
                check=False,
            )
            if size.returncode != 0:  # joining a user namespace may be refused; try the net namespace only
                size = run(
                    "nsenter", "-t", str(proc.pid), "-n", "nbdinfo", "--size", "nbd://127.0.0.1:10809/disk"
                )
            assert size.stdout.strip() == str(SIZE)
    finally:
        assert stop(proc) == 0


# --- SIGTERM ---------------------------------------------------------------------------------------------


def _wait_for(predicate: Any, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigterm_while_fio_writes(served: Served, image: Path) -> None:
    fio = subprocess.Popen(
        [
            "fio",
            "--name=busy",
            "--ioengine=nbd",
            f"--uri={served.export_uri('disk')}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            f"--offset={32 * MiB}",
            f"--size={32 * MiB}",
            "--time_based",
            "--runtime=60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: export_stats(served)["requests"].get("WRITE", 0) > 200, what="fio to write")
        # A write acknowledged to another client while fio is busy.
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 1M", served.export_uri("disk"))
        os.kill(served.pid, signal.SIGTERM)
        rc = served.proc.wait(timeout=30)
        assert served.proc.stderr is not None
        err = served.proc.stderr.read()
        assert rc == 0, err
        assert "Traceback" not in err
        assert file_bytes(image, MiB, MiB) == b"\x5a" * MiB
        assert served.control is not None and not served.control.exists()  # control socket removed
        # fio lost its server: it stops on its own, with an error.
        fio_rc = fio.wait(timeout=30)
        assert fio_rc != 0
    finally:
        stop(fio)


def test_sigterm_idle_exits_zero(image: Path) -> None:
    with hikkoshi_server(str(image), "--export", "disk") as s:
        run("nbdinfo", "--size", s.export_uri("disk"))
        os.kill(s.pid, signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0
        assert s.proc.stderr is not None
        assert "Traceback" not in s.proc.stderr.read()


# --- control socket and statistics -----------------------------------------------------------------------


def test_stats_count_known_io(served: Served) -> None:
    uri = served.export_uri("disk")
    before = export_stats(served)
    assert before["region_size"] == MiB
    assert len(before["region_reads"]) >= 64
    run("qemu-io", "-f", "raw", "-c", "read 8M 1M", uri)
    run("qemu-io", "-f", "raw", "-c", "write -P 1 20M 4k", "-c", "write -P 2 32501760 8k", uri)
    after = export_stats(served)

    def delta(key: str) -> list[int]:
        return [x - y for x, y in zip(after[key], before[key], strict=True)]

    assert after["requests"].get("READ", 0) - before["requests"].get("READ", 0) == 1
    assert after["requests"].get("WRITE", 0) - before["requests"].get("WRITE", 0) == 2
    assert after["bytes_read"] - before["bytes_read"] == MiB
    assert after["bytes_written"] - before["bytes_written"] == 4096 + 8192
    reads = delta("region_reads")
    assert reads[8] == 1 and sum(reads) == 1
    writes = delta("region_writes")
    assert writes[20] == 1 and writes[30] == 1 and writes[31] == 1 and sum(writes) == 3
    assert after["errors"] == before["errors"]
    assert after["connections_total"] - before["connections_total"] == 2
    assert sum(after["latency_us"]["histogram_log2"]) >= 3


def test_stats_count_errors(image: Path, tmp_path: Path) -> None:
    ctl = tmp_path / "c.sock"
    with hikkoshi_server(str(image), "--export", "disk", "--read-only", "--control", f"unix:{ctl}") as s:

        async def write_anyway() -> None:
            async with NbdClient(s.export_uri("disk")) as c:
                for _ in range(3):
                    with pytest.raises(CommandError):
                        await c.write(0, b"x" * 512)

        asyncio.run(write_anyway())
        st = export_stats(s)
    assert st["errors"] == 3
    assert st["requests"]["WRITE"] == 3
    assert st["bytes_written"] == 0


def test_connections_are_released_after_clients_leave(served: Served) -> None:
    """Every client that disconnects (after FLUSH + DISC, as qemu and libnbd do) is let go by the server."""
    uri = served.export_uri("disk")
    for _ in range(5):
        run("qemu-io", "-f", "raw", "-c", "write -P 9 0 4k", uri)

    async def clients() -> None:
        for _ in range(10):
            async with NbdClient(uri) as c:
                await c.write(0, b"y" * 4096)
                await c.flush()

    asyncio.run(clients())
    assert export_stats(served)["connections_total"] == 15
    deadline = time.monotonic() + 5
    while export_stats(served)["connections"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert export_stats(served)["connections"] == 0, "connections left open after the clients disconnected"


def test_control_commands(served: Served) -> None:
    assert served.control is not None
    assert stat.S_IMODE(served.control.stat().st_mode) == 0o600
    listening_ = control(served, "listening")
    assert listening_ == [f"127.0.0.1:{served.port}"]
    (export,) = control(served, "exports")
    assert export["name"] == "disk" and export["size"] == SIZE and export["read_only"] is False
    assert {"help", "stats", "exports", "listening"} <= set(control(served, "help"))
    with pytest.raises(ControlError, match="unknown command"):
        control(served, "nosuch")
    with pytest.raises(ControlError, match="no export"):
        control(served, "stats", export="nosuch")
    # Garbage on the control socket gets an error line, and the socket still answers.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(served.control))
        sock.sendall(b"this is not json\n[1, 2]\n")
        f = sock.makefile("rb")
        first, second = json.loads(f.readline()), json.loads(f.readline())
        assert first["ok"] is False and "JSON" in first["error"]
        assert second["ok"] is False
        sock.sendall(b'{"command": "stats"}\n')
        assert json.loads(f.readline())["ok"] is True


def test_stats_cli(served: Served) -> None:
    run("qemu-io", "-f", "raw", "-c", "read 4M 64k", served.export_uri("disk"))
    ctl = f"unix:{served.control}"
    proc = hikkoshi("nbd", "stats", "--control", ctl, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"disk"}
    assert data["disk"]["size"] == SIZE
    assert data["disk"]["bytes_read"] == 65536
    assert "region_reads" not in data["disk"]
    proc = hikkoshi("nbd", "stats", "--control", ctl, "--json", "--regions", "--export", "disk")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["disk"]["region_reads"][4] == 1
    proc = hikkoshi("nbd", "stats", "--control", ctl)  # the human table
    assert proc.returncode == 0, proc.stderr
    assert "disk" in proc.stdout and "65,536" in proc.stdout
    proc = hikkoshi("nbd", "stats", "--control", ctl, "--export", "nosuch")
    assert proc.returncode == 1 and "nosuch" in proc.stderr and "Traceback" not in proc.stderr


def test_stats_cli_without_a_server(tmp_path: Path) -> None:
    proc = hikkoshi("nbd", "stats", "--control", f"unix:{tmp_path / 'none.sock'}", "--json")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("hikkoshi nbd stats:")


# --- bad command lines -----------------------------------------------------------------------------------


def _refused(*args: str) -> str:
    proc = hikkoshi("nbd", "serve", *args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "hikkoshi: serving" not in proc.stdout
    return proc.stderr


def test_missing_image(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.raw"
    err = _refused(str(missing), "--listen", "127.0.0.1:0")
    assert str(missing) in err


def test_missing_image_among_several(image: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone.raw"
    err = _refused(str(image), str(missing), "--listen", "127.0.0.1:0")
    assert str(missing) in err


def test_image_is_a_directory(tmp_path: Path) -> None:
    err = _refused(str(tmp_path), "--listen", "127.0.0.1:0")
    assert str(tmp_path) in err


def test_duplicate_export_name(image: Path, tmp_path: Path) -> None:
    other = make_image(tmp_path / "other.raw", 4 * MiB)
    err = _refused(str(image), str(other), "--export", "x", "--export", "x", "--listen", "127.0.0.1:0")
    assert "duplicate" in err and "'x'" in err


def test_duplicate_default_export_name(tmp_path: Path) -> None:
    # Two images with the same file name in different directories: same default export name.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = make_image(tmp_path / "a" / "disk.raw", 4 * MiB)
    two = make_image(tmp_path / "b" / "disk.raw", 4 * MiB)
    assert "duplicate" in _refused(str(one), str(two), "--listen", "127.0.0.1:0")


def test_more_names_than_images(image: Path) -> None:
    assert "export names" in _refused(str(image), "--export", "a", "--export", "b", "--listen", "127.0.0.1:0")


def test_bad_listen_address(image: Path) -> None:
    assert "listen" in _refused(str(image), "--listen", "127.0.0.1:notaport")


def test_address_in_use(image: Path, served: Served) -> None:
    err = _refused(str(image), "--listen", f"127.0.0.1:{served.port}")
    assert str(served.port) in err or "in use" in err
    run("nbdinfo", "--size", served.export_uri("disk"))  # the first server is unharmed


def test_tls_key_without_cert(image: Path, tmp_path: Path) -> None:
    assert "--tls-cert" in _refused(
        str(image), "--tls-key", str(tmp_path / "k.pem"), "--listen", "127.0.0.1:0"
    )


def test_missing_tls_files(image: Path, tmp_path: Path) -> None:
    err = _refused(
        str(image),
        "--tls-cert",
        str(tmp_path / "c.pem"),
        "--tls-key",
        str(tmp_path / "k.pem"),
        "--listen",
        "127.0.0.1:0",
    )
    assert "c.pem" in err
