"""Starting real NBD servers (ours and peers) as subprocesses for tests, and stopping them by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Served:
    """A running server process and where it listens."""

    proc: subprocess.Popen[str]
    uri: str  # nbd://127.0.0.1:PORT/ (no export name) or nbd+unix:///?socket=PATH
    port: int | None = None
    control: Path | None = None

    def export_uri(self, name: str = "") -> str:
        if "?socket=" in self.uri:
            base, sock = self.uri.split("?", 1)
            scheme = base.split(":", 1)[0]
            return f"{scheme}:///{name}?{sock}"
        return self.uri.rstrip("/") + "/" + name

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Stop a process by pid; escalate to SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def hikkoshi_server(*args: str, timeout: float = 20, command: str = "serve") -> Iterator[Served]:
    """Run ``hikkoshi nbd COMMAND ARGS`` (default --listen 127.0.0.1:0) and yield once it serves."""
    argv = list(args)
    if "--listen" not in argv:
        argv += ["--listen", "127.0.0.1:0"]
    control = None
    if "--control" in argv:
        control = Path(argv[argv.index("--control") + 1].removeprefix("unix:"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hikkoshi", "nbd", command, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("hikkoshi: serving ") or not line:
                break
        if not line.startswith("hikkoshi: serving "):
            err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
            raise RuntimeError(f"server did not start: {line!r} {err}")
        uri = line.removeprefix("hikkoshi: serving ").strip()
        port = None
        if uri.startswith(("nbd://", "nbds://")):
            port = int(uri.rsplit(":", 1)[1].rstrip("/"))
        yield Served(proc, uri, port, control)
    finally:
        stop(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


@contextlib.contextmanager
def _peer(cmd: list[str], port: int) -> Iterator[Served]:
    """Run a peer server command listening on ``port``; stop it by pid."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_port(port)
        yield Served(proc, f"nbd://127.0.0.1:{port}/", port)
    finally:
        stop(proc)


@contextlib.contextmanager
def peer_server(kind: str, image: Path, *, read_only: bool = False) -> Iterator[Served]:
    """Run qemu-nbd or nbdkit's file plugin on 127.0.0.1."""
    port = free_port()
    if kind == "qemu-nbd":
        cmd = ["qemu-nbd", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port), "--shared=16"]
        cmd += ["-r"] if read_only else []
        cmd += [str(image)]
    elif kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port)] + (["-r"] if read_only else [])
        cmd += ["file", str(image)]
    else:
        raise ValueError(kind)
    with _peer(cmd, port) as served:
        yield served


@contextlib.contextmanager
def shuffling_server(image: Path, max_delay_ms: int = 20) -> Iterator[Served]:
    """A read-only nbdkit server on ``image`` that answers reads after random delays, in parallel.

    Replies therefore come back out of order, as the protocol allows (xNBD mixed them up).
    """
    port = free_port()
    size = image.stat().st_size
    pread = (
        f"sleep 0.$(printf %03d $((RANDOM % {max_delay_ms + 1})))\n"
        f'dd if="{image}" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none'
    )
    cmd = [
        "nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(port), "--threads", "32", "eval",
        f"get_size=echo {size}", f"pread={pread}", "thread_model=echo parallel", "can_multi_conn=exit 0",
    ]  # fmt: skip
    with _peer(cmd, port) as served:
        yield served


def run_tool(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool with a bounded time; with ``check``, fail the test on a non-zero exit, showing stderr."""
    import pytest

    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # run() has killed it
        pytest.fail(f"{argv} did not finish within {timeout}s")
    if check:
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc
