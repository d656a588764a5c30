"""Fuzz our NBD server: many malformed and hostile client sessions, counted.

    .venv/bin/python -m bench.run_fuzz --cases 100000 --seed 1 [--workers 32] [--timeout 10]

One ``hikkoshi nbd serve`` (TCP on 127.0.0.1 and a Unix socket) takes every case of bench/fuzz_cases.py:
a connection that sends the case's bytes, says it is done (EOF), and reads until the server closes. Counted:

- crashes: the server process died (it is started again, and the case recorded);
- hangs: the server neither closed nor sent anything for ``--timeout`` seconds after the client's EOF;
- server errors: lines the server logged at ERROR (what it logs for a bug that cost one connection, or an
  asyncio callback that failed) or tracebacks;
- refused: connections closed before the greeting (none are expected: the caps are far above the load).

Every ``--check-every`` cases, and at the end, a well-behaved client must read what the image file holds,
and at the end ``qemu-img compare`` must find export and file equal. Results (counts, elapsed, the
seed, the first failing cases' indexes) go to bench/results/fuzz-<UTC timestamp>.json; the exit status is
1 if anything was found, 0 otherwise (130 when interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fuzz_cases import EXPORT, IMAGE_SIZE, Case, case
from bench.nbd_servers import HOST, spawn_logged, stop_pid
from bench.run_nbd import write_results
from hikkoshi.nbd.client import NbdClient

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HIKKOSHI = REPO_ROOT / ".venv" / "bin" / "hikkoshi"
#: Bytes of reply a case reads at most (a long READ being answered is the server working, not hanging).
_READ_LIMIT = 4 << 20


@dataclass
class Tally:
    """What a run found so far."""

    cases: int = 0
    crashes: int = 0
    hangs: int = 0
    server_errors: int = 0
    refused: int = 0
    health_failures: int = 0
    by_family: Counter[str] = field(default_factory=Counter)
    #: The first case indexes of each kind of finding (and the first error lines logged).
    examples: dict[str, list[Any]] = field(default_factory=dict)

    def note(self, kind: str, index: int) -> None:
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 20:
            self.examples[kind].append(index)

    @property
    def found(self) -> int:
        return self.crashes + self.hangs + self.server_errors + self.refused + self.health_failures


class Target:
    """The server under test: started, restarted after a crash, and its log read for errors."""

    def __init__(self, command: Sequence[str], image: Path, workdir: Path, extra: Sequence[str] = ()) -> None:
        #: How to run the hikkoshi CLI (its path, or ``python -m hikkoshi``).
        self.command = list(command)
        self.image = image
        self.sock = workdir / "fuzz-nbd.sock"
        self.log = workdir / "fuzz-server.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log_pos = 0

    def start(self) -> None:
        argv = [*self.command, "nbd", "serve", str(self.image), "--export", EXPORT]
        argv += ["--listen", f"{HOST}:0", "--listen", f"unix:{self.sock}", *self.extra]
        self.proc, offset = spawn_logged(argv, self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            for line in text.splitlines():
                if line.startswith("hikkoshi: serving nbd://"):
                    self.port = int(line.rsplit(":", 1)[1].rstrip("/"))
                    self._log_pos = self.log.stat().st_size
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited at start: {text[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("the server did not start")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)

    def new_errors(self) -> list[str]:
        """Lines the server logged at ERROR (or tracebacks) since the last call."""
        with open(self.log, "rb") as f:
            f.seek(self._log_pos)
            text = f.read().decode(errors="replace")
            self._log_pos = f.tell()
        return [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]


async def run_case(c: Case, target: Target, hang_after: float) -> str:
    """One case: ``ok``, ``hang`` or ``refused``."""
    try:
        if c.unix:
            reader, writer = await asyncio.open_unix_connection(str(target.sock))
        else:
            reader, writer = await asyncio.open_connection(HOST, target.port)
    except OSError:
        return "refused"
    try:
        async with asyncio.timeout(hang_after):
            if c.read_greeting:
                try:
                    await reader.readexactly(18)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return "refused"
            try:
                writer.write(c.data)
                await writer.drain()
                writer.write_eof()
            except (ConnectionError, OSError):
                pass  # the server hung up while we sent: that is an answer
            got = 0
            while got < _READ_LIMIT:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    break
                got += len(chunk)
        return "ok"
    except TimeoutError:
        return "hang"
    except (ConnectionError, OSError):
        return "ok"
    finally:
        writer.transport.abort()


def _file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


async def healthy(target: Target) -> bool:
    """A well-behaved client reads what the image file holds, at a few places."""
    spots = [(0, 4096), (4 << 20, 65536), (48 << 20, 1 << 20), (IMAGE_SIZE - 8192, 8192)]
    try:
        async with asyncio.timeout(30), NbdClient(f"nbd://{HOST}:{target.port}/{EXPORT}") as client:
            for offset, length in spots:
                if await client.read(offset, length) != _file_bytes(target.image, offset, length):
                    return False
        return True
    except (OSError, TimeoutError):
        return False


async def fuzz(
    seed: int, first: int, count: int, target: Target, workers: int, hang_after: float, check_every: int
) -> Tally:
    """Run cases ``first``..``first+count-1`` of ``seed`` against ``target`` (started), ``workers`` at once,
    with a health check every ``check_every`` cases."""
    tally = Tally()

    async def worker(indexes: Iterator[int]) -> None:
        for index in indexes:  # shared by the workers: each index is taken once
            c = case(seed, index)
            outcome = await run_case(c, target, hang_after)
            tally.cases += 1
            tally.by_family[c.family] += 1
            if outcome == "hang":
                tally.hangs += 1
                tally.note("hangs", index)
            elif outcome == "refused" and target.alive():
                tally.refused += 1
                tally.note("refused", index)
            if not target.alive():
                tally.crashes += 1
                tally.note("crashes", index)
                target.stop()
                target.start()

    for lo in range(first, first + count, check_every):
        hi = min(first + count, lo + check_every)
        indexes = iter(range(lo, hi))
        await asyncio.gather(*(worker(indexes) for _ in range(workers)))
        errors = target.new_errors()
        if errors:
            tally.server_errors += len(errors)
            tally.examples.setdefault("server_error_lines", []).extend(errors[:5])
        if not await healthy(target):
            tally.health_failures += 1
            tally.note("health_failures", hi)
        print(f"  {hi - first:>7} cases, {tally.found} found", file=sys.stderr, flush=True)
    return tally


def qemu_img_compare(target: Target) -> bool:
    proc = subprocess.run(
        [
            "qemu-img",
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            str(target.image),
            f"nbd://{HOST}:{target.port}/{EXPORT}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode == 0


def make_image(path: Path, seed: int) -> None:
    """A sparse image with random data in every other MiB of its first half."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for off in range(0, IMAGE_SIZE // 2, 2 << 20):
            f.seek(off)
            f.write(rng.randbytes(1 << 20))


def _revision() -> dict[str, Any]:
    """The commit under test, and whether src/ differs from it."""

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src")
    return {"git_rev": git("rev-parse", "HEAD"), "src_dirty": bool(status) if status is not None else None}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run_fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=100_000, help="how many cases (default 100000)")
    p.add_argument("--seed", type=int, default=None, help="the run's seed (default: a random one, recorded)")
    p.add_argument("--first", type=int, default=0, help="index of the first case (to replay a range)")
    p.add_argument("--workers", type=int, default=32, help="cases at once (default 32)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a silent server is a hang")
    p.add_argument("--check-every", type=int, default=5000, help="cases between health checks")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/hikkoshi-bench"), help="image and log")
    p.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--hikkoshi", type=Path, default=DEFAULT_HIKKOSHI, help="the hikkoshi CLI to test")
    p.add_argument(
        "--server-args",
        default="",
        metavar="ARGS",
        help="more options for nbd serve, e.g. '--memory-budget 1M --connection-memory 256K' (tight "
        "memory: requests wait for it and payload buffers grow and are reused under the fuzz)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = args.workdir / "fuzz-image.raw"
    make_image(image, seed)
    target = Target([str(args.hikkoshi)], image, args.workdir, shlex.split(args.server_args))
    print(f"fuzz: seed {seed}, cases {args.first}..{args.first + args.cases - 1}", file=sys.stderr)
    t0 = time.monotonic()
    interrupted = False
    tally = Tally()
    try:
        target.start()
        tally = asyncio.run(
            fuzz(seed, args.first, args.cases, target, args.workers, args.timeout, args.check_every)
        )
        if not qemu_img_compare(target):
            tally.health_failures += 1
            tally.note("health_failures", args.first + args.cases)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        target.stop()
    elapsed = time.monotonic() - t0
    if not interrupted:
        tally.server_errors += len(target.new_errors())  # anything logged while shutting down
    results: dict[str, Any] = {
        "schema": 1,
        "kind": "nbd-fuzz",
        "started_utc": now.isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "bench.run_fuzz", *(argv if argv is not None else sys.argv[1:])]
        ),
        "seed": seed,
        "first_case": args.first,
        "cases": tally.cases,
        "crashes": tally.crashes,
        "hangs": tally.hangs,
        "server_errors": tally.server_errors,
        "refused": tally.refused,
        "health_failures": tally.health_failures,
        "elapsed_s": round(elapsed, 1),
        "cases_per_s": round(tally.cases / elapsed, 1) if elapsed else None,
        "by_family": dict(sorted(tally.by_family.items())),
        "examples": tally.examples,
        "settings": {
            "workers": args.workers,
            "timeout_s": args.timeout,
            "check_every": args.check_every,
            "server_args": args.server_args,
        },
        "server_log": str(target.log),
        "hikkoshi": _revision(),
        "machine": {
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_at_end": list(os.getloadavg()),
        },
        "interrupted": interrupted,
    }
    path = write_results(results, args.output_dir, stamp, kind="fuzz")
    print(
        f"fuzz: {tally.cases} cases in {elapsed:.1f} s (seed {seed}): {tally.crashes} crashes, {tally.hangs} "
        f"hangs, {tally.server_errors} server errors, {tally.refused} refused, {tally.health_failures} "
        f"failed health checks\nresults: {path}"
    )
    if interrupted:
        return 130
    return 1 if tally.found else 0


if __name__ == "__main__":
    sys.exit(main())
