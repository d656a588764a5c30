"""The test guest booted by QEMU directly (no VM runtime), its disk through our NBD server: the ``guest``
fixture, :func:`run_guest`, :func:`nbd_server`. Everything started here is stopped by pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from hikkoshi.guest.guest_image import GuestImage, build_guest, qemu_command

BOOT_TIMEOUT = 180.0


def nbd_server_command(image: Path, port: int) -> list[str]:
    """The NBD server the guest's disk goes through: ours.

    For comparison with a reference server, return instead
    ``["qemu-nbd", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port), str(image)]``.
    """
    script = Path(sys.executable).with_name("hikkoshi")
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "hikkoshi"]
    return [*prefix, "nbd", "serve", str(image), "--listen", f"127.0.0.1:{port}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process by pid, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


@contextlib.contextmanager
def nbd_server(image: Path, log: Path, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``image`` with :func:`nbd_server_command`; yield its URI once it accepts connections."""
    port = _free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            nbd_server_command(image, port), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"NBD server exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"NBD server not listening on port {port} after {timeout} s:\n{_tail(log)}")
            time.sleep(0.05)
        yield f"nbd://127.0.0.1:{port}"
    finally:
        _stop(proc)


@dataclass(frozen=True)
class GuestRun:
    """How a guest run ended."""

    returncode: int
    console: str
    seconds: float


def run_guest(
    guest: GuestImage,
    drive_uri: str | None,
    workload: str,
    workdir: Path,
    params: Mapping[str, str | int] | None = None,
    timeout: float = BOOT_TIMEOUT,
) -> GuestRun:
    """Boot ``guest`` into ``workload`` and wait (bounded) for QEMU to exit."""
    console_log = workdir / f"{workload}-console.log"
    qemu_log = workdir / f"{workload}-qemu.log"
    cmd = qemu_command(guest, drive_uri, workload, console_log=console_log, params=params)
    start = time.monotonic()
    with qemu_log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"guest still running after {timeout} s; console:\n{_tail(console_log)}")
    finally:
        _stop(proc)
    seconds = time.monotonic() - start
    console = console_log.read_text(errors="replace") if console_log.exists() else ""
    if proc.returncode != 0:
        pytest.fail(f"QEMU exited with {proc.returncode}:\n{_tail(qemu_log)}\nconsole:\n{console[-3000:]}")
    return GuestRun(proc.returncode, console, seconds)


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    """The test guest, built (or found) in the default cache."""
    for tool in ("qemu-system-x86_64", "apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    return build_guest()
