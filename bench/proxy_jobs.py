"""Processes and measurements of the relocation proxy benchmark (bench/run_proxy.py).

Every process (source server, proxy, WAN relay, fio) is started with `--listen 127.0.0.1:0` where it
listens at all, in its own session, with a parent-death signal; its port is read from its ready line in
its log, and it is stopped by pid (SIGTERM, then SIGKILL after a grace period). The proxy's progress is
read from its control socket with the same JSON `status` request that `hikkoshi nbd status --json`
sends, over a plain socket: a CLI process per 0.1 s poll would cost a Python start-up each time, a
large share of two cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.fio_jobs import ClientError, Workload, parse_fio_json
from bench.nbd_servers import _child_setup, process_tree_cpu_seconds, signals_deferred, spawn_logged

HOST = "127.0.0.1"
SOURCE_EXPORT = "src"

_READY_RE = re.compile(r"hikkoshi: (?:serving nbd://|wan listening on )127\.0\.0\.1:(\d+)")
_CHUNK = 8 << 20

# `hikkoshi wan` through its own parser, whether or not cli/main.py registers the command yet.
WAN_SHIM = (
    "import argparse, sys\n"
    "from hikkoshi.cli import wan\n"
    "p = argparse.ArgumentParser(prog='hikkoshi')\n"
    "wan.add_parser(p.add_subparsers(dest='command', required=True))\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.func(a))\n"
)


class JobError(RuntimeError):
    """A process did not start, died, or a measurement produced nothing usable."""


# --- daemons --------------------------------------------------------------------------------------------


class Daemon:
    """A long-running process that prints a ready line with its port; a context manager that stops it."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, stop_grace_s: float = 10.0) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.stop_grace_s = stop_grace_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None
        self.t_start = 0.0  # perf_counter just before the process was created
        self.t_ready = 0.0  # perf_counter when its ready line was seen
        self._log_offset = 0

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise JobError(f"{self.name} is not running")
        return self.proc.pid

    def uri(self, export: str = "") -> str:
        return f"nbd://{HOST}:{self.port}/{export}"

    def start(self, ready_timeout_s: float = 60.0) -> None:
        self.t_start = time.perf_counter()
        self.proc, self._log_offset = spawn_logged(self.argv, self.log_path)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            match = _READY_RE.search(self._log_text())
            if match is not None:
                self.t_ready = time.perf_counter()
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                status = self.proc.returncode
                self.stop()
                raise JobError(f"{self.name} exited with {status} before it was ready: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise JobError(f"{self.name} not ready after {ready_timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.005)

    def _log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        tail = [line for line in self._log_text().strip().splitlines() if line][-lines:]
        return " | ".join(tail) if tail else "(empty log)"

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            status = None if self.proc is None else self.proc.returncode
            raise JobError(f"{self.name} died (exit status {status}): {self.log_tail()}")

    def cpu_seconds(self) -> float:
        return process_tree_cpu_seconds(self.pid)

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after the grace period, then its process group; always reaps."""
        proc = self.proc
        if proc is None:
            return
        with signals_deferred():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self.stop_grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.exit_status = proc.returncode
            self.proc = None


def source_argv(hikkoshi: Path, image: Path) -> list[str]:
    return [str(hikkoshi), "nbd", "serve", str(image), "--export", SOURCE_EXPORT, "--listen", f"{HOST}:0"]


def proxy_argv(hikkoshi: Path, upstream: str, cache: Path, control: Path, extra: list[str]) -> list[str]:
    return [
        str(hikkoshi),
        "nbd",
        "proxy",
        "--upstream",
        upstream,
        "--cache",
        str(cache),
        "--listen",
        f"{HOST}:0",
        "--control",
        f"unix:{control}",
        *extra,
    ]


def wan_cli_registered(hikkoshi: Path) -> bool:
    """Whether `hikkoshi wan` is a command of the CLI (else the relay runs through WAN_SHIM)."""
    try:
        probe = subprocess.run(
            [str(hikkoshi), "wan", "--help"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def wan_argv(hikkoshi: Path | None, to_port: int, delay: str, rate: str) -> list[str]:
    """`hikkoshi wan ...`, or (hikkoshi None) the same through `python -c WAN_SHIM wan ...`."""
    head = [str(hikkoshi)] if hikkoshi is not None else [sys.executable, "-c", WAN_SHIM]
    return [
        *head,
        "wan",
        "--listen",
        f"{HOST}:0",
        "--to",
        f"{HOST}:{to_port}",
        "--delay",
        delay,
        "--rate",
        rate,
    ]


def wan_importable() -> str | None:
    """Why the WAN emulator cannot be used here, or None when it can (checked in a fresh interpreter)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import hikkoshi.cli.wan, hikkoshi.lab.wan, hikkoshi.lab.link_model"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode == 0:
        return None
    tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["(no output)"]
    return f"import failed: {tail[0]}"


_WAN_STOP_RE = re.compile(r"wan stopped after (\d+) connections, (\d+) bytes up, (\d+) bytes down")


def wan_totals(relay: Daemon) -> dict[str, int] | None:
    """The relay's final counters from its log (it prints them when stopped)."""
    match = _WAN_STOP_RE.search(relay._log_text())
    if match is None:
        return None
    return {
        "connections": int(match.group(1)),
        "bytes_up": int(match.group(2)),
        "bytes_down": int(match.group(3)),
    }


def remove_cache(cache: Path) -> None:
    cache.unlink(missing_ok=True)
    cache.with_name(cache.name + ".bitmap").unlink(missing_ok=True)


# --- the proxy's control socket -------------------------------------------------------------------------


def control_request(path: Path, command: str, timeout_s: float = 10.0, **args: Any) -> Any:
    """One JSON request on the control socket; its result (raises JobError on an error answer)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise JobError(f"control socket {path} closed without an answer")
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise JobError(f"control {command}: {answer.get('error')}")
    return answer.get("result")


@dataclass
class Progress:
    """What polling the status every `poll_s` saw until the upstream was detached."""

    t_all_local: float | None = None  # perf_counter of the first poll with every byte present
    t_detached: float | None = None  # perf_counter of the first poll that said "detached"
    polls: int = 0
    final: dict[str, Any] = field(default_factory=dict)
    samples: list[tuple[float, int, str, str]] = field(default_factory=list)  # (s since start, present, ...)


def wait_detached(
    proxy: Daemon, control: Path, timeout_s: float, poll_s: float = 0.1, until_phase: str | None = None
) -> Progress:
    """Poll the status every `poll_s` until the upstream is detached (or the phase is `until_phase`)."""
    progress = Progress()
    deadline = time.perf_counter() + timeout_s
    next_poll = time.perf_counter()
    while True:
        proxy.check_alive()
        status: dict[str, Any] = control_request(control, "status")
        now = time.perf_counter()
        progress.polls += 1
        progress.final = status
        progress.samples.append(
            (round(now - proxy.t_start, 3), int(status["present_bytes"]), status["upstream"], status["phase"])
        )
        if progress.t_all_local is None and status["present_bytes"] >= status["size"]:
            progress.t_all_local = now
        if until_phase is not None and status["phase"] == until_phase:
            return progress
        if status["upstream"] == "detached":
            progress.t_detached = now
            return progress
        if now > deadline:
            raise JobError(f"not detached after {timeout_s:.0f} s: {status}")
        next_poll += poll_s
        time.sleep(max(0.0, next_poll - time.perf_counter()))


def thin_samples(samples: list[tuple[float, int, str, str]], keep: int = 60) -> list[Any]:
    """At most about `keep` evenly spaced samples (and the last), for the result file."""
    if len(samples) <= keep:
        return list(samples)
    step = len(samples) / keep
    out = [samples[int(i * step)] for i in range(keep)]
    out.append(samples[-1])
    return out


# --- clients --------------------------------------------------------------------------------------------


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line][-lines:]
    return " | ".join(kept) if kept else "(no output)"


def nbdcopy_read(uri: str, timeout_s: float = 900.0) -> tuple[float, list[str]]:
    """`nbdcopy URI null:` once; seconds taken and the command."""
    argv = ["nbdcopy", uri, "null:"]
    t0 = time.perf_counter()
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise ClientError(f"nbdcopy exited {done.returncode}: {_tail(done.stderr + done.stdout)}")
    return seconds, argv


def fio_argv(
    name: str,
    uri: str,
    rw: str,
    bs: str,
    iodepth: int,
    output: Path,
    *,
    runtime_s: int | None = None,
    ramp_s: int = 0,
) -> list[str]:
    """fio's nbd engine, one job, one connection; one pass over the export unless `runtime_s`."""
    argv = [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        "--numjobs=1",
    ]
    if runtime_s is not None:
        argv += ["--time_based=1", f"--runtime={runtime_s}", f"--ramp_time={ramp_s}"]
    if rw.startswith("rand"):
        argv.append("--norandommap=1")
    argv += ["--output-format=json", f"--output={output}"]
    return argv


def _fio_sections(text: str, directions: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for direction in directions:
        workload = Workload(
            direction, "fio", "IOPS", "", direction="read" if direction == "read" else "write"
        )
        _, details = parse_fio_json(text, workload)
        out[direction] = details
    return out


def run_fio(argv: list[str], output: Path, directions: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
    """Run fio to completion; per-direction summaries (iops, bw, clat percentiles in µs)."""
    output.unlink(missing_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise ClientError(f"fio exited {done.returncode}: {_tail(done.stderr + done.stdout)}")
    try:
        text = output.read_text()
    except OSError as exc:
        raise ClientError(f"fio wrote no output: {exc}") from exc
    finally:
        output.unlink(missing_ok=True)
    result: dict[str, Any] = {"wall_s": round(wall, 3), **_fio_sections(text, directions)}
    return result


class BackgroundFio:
    """fio started now and stopped (SIGINT, so it still writes its JSON) when the caller says."""

    def __init__(self, argv: list[str], output: Path, directions: tuple[str, ...]) -> None:
        self.argv = argv
        self.output = output
        self.directions = directions
        output.unlink(missing_ok=True)
        with signals_deferred():
            self.t_start = time.perf_counter()
            self.proc: subprocess.Popen[str] | None = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
                preexec_fn=_child_setup,
            )

    def __enter__(self) -> BackgroundFio:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with signals_deferred():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
            self.proc = None
        self.output.unlink(missing_ok=True)

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """SIGINT, wait, and parse what fio measured until then."""
        proc = self.proc
        if proc is None:
            raise ClientError("fio already stopped")
        if proc.poll() is not None:
            out, _ = proc.communicate()
            self.proc = None
            raise ClientError(f"fio ended early with {proc.returncode}: {_tail(out)}")
        with signals_deferred():
            proc.send_signal(signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            self.proc = None
        wall = time.perf_counter() - self.t_start
        try:
            text = self.output.read_text()
        except OSError as exc:
            raise ClientError(f"fio wrote no output after SIGINT ({proc.returncode}): {_tail(out)}") from exc
        finally:
            self.output.unlink(missing_ok=True)
        return {"wall_s": round(wall, 3), **_fio_sections(text, self.directions)}


# --- latency of single reads with our client ------------------------------------------------------------


def percentiles_ms(samples_s: list[float]) -> dict[str, float | int | None]:
    """p50/p90/p99 (inclusive quantiles), mean, min, max in milliseconds."""
    if not samples_s:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    ms = sorted(s * 1000.0 for s in samples_s)
    if len(ms) >= 2:
        q = statistics.quantiles(ms, n=100, method="inclusive")
        p50, p90, p99 = q[49], q[89], q[98]
    else:
        p50 = p90 = p99 = ms[0]
    return {
        "n": len(ms),
        "p50_ms": round(p50, 3),
        "p90_ms": round(p90, 3),
        "p99_ms": round(p99, 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(ms[0], 3),
        "max_ms": round(ms[-1], 3),
    }


async def _timed_reads(uri: str, offsets: list[int]) -> tuple[list[float], list[bytes]]:
    """Read 4 KiB at each offset, one request at a time; (seconds per read, data)."""
    from hikkoshi.nbd.client import NbdClient

    times: list[float] = []
    datas: list[bytes] = []
    async with NbdClient(uri) as client:
        for offset in offsets:
            t0 = time.perf_counter()
            data = await client.read(offset, 4096)
            times.append(time.perf_counter() - t0)
            datas.append(data)
    return times, datas


def read_latency_probe(
    uri: str,
    image: Path,
    block_size: int,
    blocks: int,
    rounds: int,
    seed: int,
    region: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Any]:
    """4 KiB reads, one at a time, with hikkoshi's NbdClient: of missing blocks, then of present ones.

    `blocks` distinct proxy blocks are picked at random in `region` (fractions of the disk); none was read
    before, so the first read of each fetches its block from the upstream (unless a background copy got
    there first). Then the same blocks are read `rounds` times more at other 4 KiB offsets: they are
    present by then. Every byte is compared with the image.
    """
    from hikkoshi.daemons.process import run

    rng = random.Random(seed)
    size = image.stat().st_size
    lo, hi = int(region[0] * (size // block_size)), int(region[1] * (size // block_size))
    chosen = rng.sample(range(lo, hi), min(blocks, hi - lo))
    per_block = block_size // 4096
    missing_at = [b * block_size + rng.randrange(per_block) * 4096 for b in chosen]
    present_at = [b * block_size + rng.randrange(per_block) * 4096 for _ in range(rounds) for b in chosen]
    t0 = time.perf_counter()
    times, datas = run(_timed_reads(uri, missing_at + present_at))
    seconds = time.perf_counter() - t0
    mismatches = 0
    with open(image, "rb") as src:
        for offset, data in zip(missing_at + present_at, datas, strict=True):
            src.seek(offset)
            mismatches += data != src.read(4096)
    missing = times[: len(missing_at)]
    present = times[len(missing_at) :]
    return {
        "blocks": len(chosen),
        "present_rounds": rounds,
        "region": list(region),
        "seconds": round(seconds, 3),
        "mismatches": mismatches,
        "missing": percentiles_ms(missing),
        "present": percentiles_ms(present),
        "missing_raw_ms": [round(t * 1000, 3) for t in missing],
    }


# --- files ----------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def write_random_tree(root: Path, total: int, seed: int) -> list[tuple[str, int]]:
    """Random files of mixed sizes (64 KiB .. 8 MiB) in a few directories, `total` bytes in all."""
    rng = random.Random(seed)
    files: list[tuple[str, int]] = []
    left = total
    index = 0
    while left > 0:
        size = min(left, rng.choice((64 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20)))
        rel = f"d{index % 4}/f{index:04d}.bin"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            remaining = size
            while remaining:
                n = min(remaining, _CHUNK)
                f.write(os.urandom(n))
                remaining -= n
        files.append((rel, size))
        left -= size
        index += 1
    return files


def run_checked(argv: list[str], timeout_s: float = 600.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise JobError(f"{' '.join(argv)} exited {done.returncode}: {_tail(done.stderr + done.stdout)}")
    return done


def ext4_used_bytes(image: Path) -> dict[str, int]:
    """Block size, block count and free blocks from `dumpe2fs -h`."""
    out = run_checked(["dumpe2fs", "-h", str(image)]).stdout
    fields: dict[str, int] = {}
    for key, name in (("Block size", "block_size"), ("Block count", "blocks"), ("Free blocks", "free")):
        match = re.search(rf"^{key}:\s+(\d+)", out, re.MULTILINE)
        if match is None:
            raise JobError(f"dumpe2fs -h {image}: no {key!r}")
        fields[name] = int(match.group(1))
    fields["used_bytes"] = (fields["blocks"] - fields["free"]) * fields["block_size"]
    return fields


def e2fsck_clean(image: Path) -> dict[str, Any]:
    """`e2fsck -fn` (read-only, forced): exit status 0 means no problem found."""
    argv = ["e2fsck", "-fn", str(image)]
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False
    )
    return {
        "command": argv,
        "exit_status": done.returncode,
        "ok": done.returncode == 0,
        "tail": _tail(done.stdout),
    }


def files_match(image: Path, srcdir: Path, files: list[tuple[str, int]], scratch: Path) -> dict[str, Any]:
    """Dump every file out of the ext4 image with debugfs and compare it with the original."""
    scratch.mkdir(parents=True, exist_ok=True)
    script = scratch / "dump.cmds"
    lines = [f"dump /{rel} {scratch / rel.replace('/', '_')}" for rel, _ in files]
    script.write_text("\n".join(lines) + "\n")
    run_checked(["debugfs", "-f", str(script), str(image)])
    bad: list[str] = []
    for rel, _ in files:
        dumped = scratch / rel.replace("/", "_")
        try:
            same = dumped.read_bytes() == (srcdir / rel).read_bytes()
        except OSError:
            same = False
        if not same:
            bad.append(rel)
        dumped.unlink(missing_ok=True)
    script.unlink(missing_ok=True)
    return {"files": len(files), "mismatched": bad, "ok": not bad}


def wait_quiet(seconds: float) -> None:
    """A short pause between measurements (lets writeback and the previous processes settle)."""
    time.sleep(seconds)
