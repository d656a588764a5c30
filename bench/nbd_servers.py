"""The NBD servers the data-plane benchmark compares, and their life cycle.

Each server is a subprocess on the same raw image, listening on 127.0.0.1 on a free port. It runs
in its own session (a Ctrl-C at the terminal reaches only the runner, which then stops the server
by pid) and with a parent-death signal, so a runner killed outright does not leave it behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"

OURS = "hikkoshi"
NBDKIT = "nbdkit"
QEMU_NBD = "qemu-nbd"
ALL_SERVERS: tuple[str, ...] = (OURS, NBDKIT, QEMU_NBD)

_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 5.0


class ServerError(RuntimeError):
    """A server did not start, did not become ready, or died."""


class ServerNotReady(ServerError):
    """A server kept running but never accepted an NBD connection (not worth a retry)."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one NBD server; `{image}`, `{host}` and `{port}` are filled in per start."""

    name: str
    template: tuple[str, ...]
    version_argv: tuple[str, ...]
    notes: str

    @property
    def executable(self) -> str:
        return self.template[0]

    def argv(self, image: Path, port: int) -> list[str]:
        values = {"image": str(image), "host": HOST, "port": str(port)}
        return [part.format(**values) for part in self.template]

    def uri(self, port: int) -> str:
        return f"nbd://{HOST}:{port}/"


def server_specs(hikkoshi_bin: Path) -> dict[str, ServerSpec]:
    """Every known server, with the defaults a user would pick (see docs/BENCHMARKS.md)."""
    return {
        OURS: ServerSpec(
            name=OURS,
            template=(str(hikkoshi_bin), "nbd", "serve", "{image}", "--listen", "{host}:{port}"),
            version_argv=(),
            notes="our server, default options, default export name",
        ),
        NBDKIT: ServerSpec(
            name=NBDKIT,
            template=(
                "nbdkit",
                "-f",
                "--exit-with-parent",
                "-i",
                "{host}",
                "-p",
                "{port}",
                "file",
                "{image}",
            ),
            version_argv=("nbdkit", "--version"),
            notes="file plugin, default thread model (parallel) and thread count, page cache",
        ),
        QEMU_NBD: ServerSpec(
            name=QEMU_NBD,
            template=("qemu-nbd", "-f", "raw", "-t", "-b", "{host}", "-p", "{port}", "{image}"),
            version_argv=("qemu-nbd", "--version"),
            notes="defaults: --cache=writeback (page cache), aio=threads, --shared=1, no multi-conn",
        ),
    }


def unavailable_reason(spec: ServerSpec) -> str | None:
    """Why `spec` cannot be run on this machine, or None when it can."""
    exe = spec.executable
    if os.sep in exe:
        if not os.access(exe, os.X_OK):
            return f"{exe} is not an executable file"
    elif shutil.which(exe) is None:
        return f"{exe} is not on PATH"
    if spec.name == OURS:
        try:
            probe = subprocess.run(
                [exe, "nbd", "serve", "--help"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{exe} nbd serve --help` failed: {exc}"
        if probe.returncode != 0:
            tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return f"`{exe} nbd serve --help` exited {probe.returncode}: {tail[0]}"
    return None


def free_port() -> int:
    """A TCP port on HOST that nothing listens on right now (a race remains; start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, so clean-up is not itself interrupted."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _child_setup() -> None:
    """Runs in the forked child before exec: unblock signals, die with the runner."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn_logged(argv: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start a daemon whose output is appended to ``log_path`` after a ``# argv`` line.

    Returns the process and the log offset where its own output begins (for error tails). Signals are
    held while it starts, and the child dies with the runner.
    """
    with signals_deferred(), open(log_path, "ab") as log:
        log.write(f"# {' '.join(argv)}\n".encode())
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup,  # safe: the runner is single-threaded
        )
    return proc, offset


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def stop_pid(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM by pid, SIGKILL after ``grace``, reap."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; fields after it are plain.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree_cpu_seconds(root: int) -> float:
    """User + system CPU of `root`, its live descendants, and its reaped children, in seconds."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents[int(entry)] = int(fields[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    ticks = 0
    for pid in tree:
        fields = _stat_fields(pid)
        if fields is not None:
            # utime, stime, cutime, cstime are fields 14-17 of stat(5); we dropped the first two.
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / _CLK_TCK


class RunningServer:
    """One started server; use as a context manager so it is always stopped by pid."""

    def __init__(self, spec: ServerSpec, image: Path, log_path: Path) -> None:
        self.spec = spec
        self.image = image
        self.log_path = log_path
        self.port = 0
        self.argv: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None
        self._log_offset = 0

    @property
    def uri(self) -> str:
        return self.spec.uri(self.port)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError(f"{self.spec.name} is not running")
        return self.proc.pid

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, ready_timeout_s: float = 30.0, attempts: int = 3) -> None:
        """Start on a free port and wait until nbdinfo can connect; retry a lost port race."""
        last: ServerError | None = None
        for _ in range(attempts):
            self.port = free_port()
            self.argv = self.spec.argv(self.image, self.port)
            self.proc, self._log_offset = spawn_logged(self.argv, self.log_path)
            try:
                self._wait_ready(ready_timeout_s)
                return
            except ServerNotReady:
                self.stop()
                raise
            except ServerError as exc:  # exited early, e.g. lost the race for the port
                last = exc
                self.stop()
        assert last is not None
        raise last

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.proc is not None
        while True:
            status = self.proc.poll()
            if status is not None:
                raise ServerError(
                    f"{self.spec.name} exited with {status} before it was ready: {self.log_tail()}"
                )
            try:
                probe = subprocess.run(
                    ["nbdinfo", "--size", self.uri],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
                if probe.returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise ServerNotReady(f"{self.spec.name} not ready after {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def describe(self) -> dict[str, object] | None:
        """nbdinfo's JSON for the export (sizes, multi-conn, block sizes), or None if it fails."""
        try:
            out = subprocess.run(
                ["nbdinfo", "--json", self.uri],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return None
        try:
            parsed: dict[str, object] = json.loads(out.stdout)
        except ValueError:
            return None
        return parsed

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            status = None if self.proc is None else self.proc.returncode
            raise ServerError(f"{self.spec.name} died (exit status {status}): {self.log_tail()}")

    def cpu_seconds(self) -> float:
        return process_tree_cpu_seconds(self.pid)

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL after a grace period; always reaps the process.

        Anything the server left behind in its own process group (its pid is the group's id,
        as it was started in a new session) is killed too.
        """
        proc = self.proc
        if proc is None:
            return
        with signals_deferred():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.exit_status = proc.returncode
            self.proc = None

    def log_tail(self, lines: int = 5) -> str:
        """The last lines this start of the server wrote to its log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        tail = [line for line in text.strip().splitlines() if line][-lines:]
        return " | ".join(tail) if tail else "(empty log)"


def content_check(uri: str, image: Path, chunk: int = 8 << 20) -> dict[str, object]:
    """Read the whole export over NBD and compare it with the file, so the numbers are real reads."""
    over_nbd = hashlib.sha256()
    started = time.perf_counter()
    proc = subprocess.Popen(
        ["nbdcopy", "--no-extents", uri, "-"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    received = 0
    try:
        assert proc.stdout is not None
        while block := proc.stdout.read(chunk):
            over_nbd.update(block)
            received += len(block)
        status = proc.wait(timeout=60)
    except BaseException:
        with signals_deferred():
            proc.kill()
            proc.wait()
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    seconds = time.perf_counter() - started
    in_file = hashlib.sha256()
    with open(image, "rb") as f:
        while block := f.read(chunk):
            in_file.update(block)
    ok = status == 0 and over_nbd.digest() == in_file.digest()
    return {"ok": ok, "nbdcopy_status": status, "bytes": received, "seconds": round(seconds, 3)}


def tool_version(argv: tuple[str, ...]) -> str | None:
    """First line of a tool's version output, or None if the tool is missing."""
    if not argv or shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None
