"""Benchmark the relocation proxy (`hikkoshi nbd proxy`) in one run.

    .venv/bin/python -m bench.run_proxy [--quick] [--repeat N] [--only read,relocate,wan,fs,fswan] ...

Sections (all on 127.0.0.1; the source is `hikkoshi nbd serve IMAGE --export src`, a fresh server for
every measurement, so that no earlier run's heat map orders the copy):

- read: cold read of a random-data image through a proxy with --no-background (`nbdcopy URI null:` and
  fio nbd 1 MiB sequential read iodepth 8, one pass), then the same read again once everything is local
  (warm), and fio 4 KiB random read iodepth 32 on the warm proxy; each against the same read from the
  source server directly.
- relocate: full relocation with the background copy, time from starting the proxy to its upstream
  being "detached" (status polled every 0.1 s); idle, and with fio randrw 4 KiB iodepth 8 through the
  proxy while it relocates (and the same fio on the finished proxy as a baseline); and an image of
  written (allocated) zeroes, which the source reports as data.
- wan: the same relocation across the user-space WAN emulator (25 ms each way, 100 Mbit/s each way by
  default) between proxy and source, against bytes/bandwidth and against nbdcopy over the same link;
  and 4 KiB read latency (hikkoshi's NbdClient, one at a time) of missing vs present blocks.
- fs: an ext4 image 10% full whose free space holds random garbage, relocated with --skip-fs-free and
  without (a linear copy of the whole disk); and the same file system on a sparse image.
- fswan (not run by default: ~100 s per repeat, the linear copy alone ~87 s): the garbage ext4 image
  of "fs" relocated with --skip-fs-free and without across the WAN emulator of "wan" (--wan-delay each
  way, --wan-rate), where bytes rather than fixed costs decide the time; against bytes fetched / rate.

Results (machine facts, exact commands, raw numbers) go to bench/results/proxy-<UTC timestamp>.json and
markdown tables (medians, ranges, ratios) are printed. Exit status 0 whatever the numbers say (130 when
interrupted, with partial results written; 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.fio_jobs import ClientError
from bench.nbd_servers import tool_version
from bench.options import name_list
from bench.proxy_jobs import (
    SOURCE_EXPORT,
    BackgroundFio,
    Daemon,
    JobError,
    allocated_bytes,
    control_request,
    e2fsck_clean,
    ext4_used_bytes,
    files_match,
    fio_argv,
    nbdcopy_read,
    proxy_argv,
    read_latency_probe,
    remove_cache,
    run_checked,
    run_fio,
    sha256_file,
    source_argv,
    thin_samples,
    wait_detached,
    wan_argv,
    wan_cli_registered,
    wan_importable,
    wan_totals,
    write_random_tree,
)
from bench.run_nbd import (
    DEFAULT_HIKKOSHI,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_WORKDIR,
    REPO_ROOT,
    _command_output,
    _raise_interrupt,
    ensure_filled_file,
    log,
    machine_facts,
    parse_size,
    warm_page_cache,
    write_results,
)

SECTIONS: tuple[str, ...] = ("read", "relocate", "wan", "fs", "fswan")
# What runs without --only: everything but fswan, whose linear copy across the WAN takes ~87 s a repeat.
DEFAULT_SECTIONS: tuple[str, ...] = ("read", "relocate", "wan", "fs")
MIB = 1 << 20
XNBD_MIB_S = 153.0
COLD_FLOOR_MIB_S = 5 * XNBD_MIB_S
WARM_FLOOR_RATIO = 0.9  # "ratio ~1": within the noise of this machine
PAUSE_S = 0.5
PROXY_BLOCK_DEFAULT = 64 << 10


def _sections(text: str) -> list[str]:
    return name_list(text, SECTIONS, "section")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run_proxy", description="Benchmark the relocation proxy (hikkoshi nbd proxy)."
    )
    p.add_argument(
        "--only",
        type=_sections,
        default=list(DEFAULT_SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default {','.join(DEFAULT_SECTIONS)})",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: small images, 3 s fio runs, one repeat")
    p.add_argument(
        "--repeat", type=int, default=None, help="repeats of every measurement (default 2; 1 with --quick)"
    )
    p.add_argument(
        "--size", type=parse_size, default=None, help="image for read and relocate (default 1G; 256M quick)"
    )
    p.add_argument(
        "--wan-size",
        type=parse_size,
        default=None,
        help="image relocated over the WAN (default 256M; 32M quick)",
    )
    p.add_argument("--fs-size", type=parse_size, default=None, help="ext4 image (default 1G; 256M quick)")
    p.add_argument(
        "--fs-data", type=parse_size, default=None, help="files in the ext4 image (default 10%% of --fs-size)"
    )
    p.add_argument(
        "--runtime", type=int, default=None, help="seconds of time-based fio runs (default 10; 3 quick)"
    )
    p.add_argument("--wan-delay", default="25ms", help="one-way delay of the WAN, each way (default 25ms)")
    p.add_argument("--wan-rate", default="100Mbit", help="WAN rate, each way (default 100Mbit)")
    p.add_argument(
        "--latency-blocks",
        type=int,
        default=None,
        help="missing blocks probed over the WAN (default 100; 30 quick)",
    )
    p.add_argument(
        "--latency-rounds", type=int, default=10, help="present reads per probed block (default 10)"
    )
    p.add_argument(
        "--proxy-block-size", default=None, help="pass --block-size to the proxy (default: its own, 64K)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the content checks of the first repeat")
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"images, caches, logs (default {DEFAULT_WORKDIR})",
    )
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where the JSON result goes")
    p.add_argument(
        "--hikkoshi", type=Path, default=DEFAULT_HIKKOSHI, help="our CLI (default .venv/bin/hikkoshi)"
    )
    return p


@dataclass(frozen=True)
class Settings:
    sections: list[str]
    quick: bool
    repeat: int
    size: int
    wan_size: int
    fs_size: int
    fs_data: int
    runtime_s: int
    ramp_s: int
    wan_delay: str
    wan_rate: str
    wan_rate_bps: float
    latency_blocks: int
    latency_rounds: int
    proxy_extra: list[str]
    proxy_block_size: int
    verify: bool
    workdir: Path
    output_dir: Path
    hikkoshi: Path

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            out[key] = str(value) if isinstance(value, Path) else value
        return out


def settings_from_args(argv: Sequence[str] | None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    repeat = args.repeat if args.repeat is not None else (1 if quick else 2)
    runtime = args.runtime if args.runtime is not None else (3 if quick else 10)
    if repeat < 1 or runtime < 1:
        parser.error("--repeat and --runtime must be >= 1")
    fs_size = args.fs_size if args.fs_size is not None else ((256 if quick else 1024) * MIB)
    if fs_size < 64 * MIB:
        parser.error("--fs-size must be at least 64M")
    fs_data = args.fs_data if args.fs_data is not None else fs_size // 10
    if fs_data >= fs_size // 2:
        parser.error("--fs-data must be well below --fs-size")
    try:
        from hikkoshi.cli.wan import parse_rate_bps

        rate_bps = parse_rate_bps(args.wan_rate)
    except ImportError:  # the emulator is not there: the wan section will say so
        rate_bps = 0.0
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    block_size = PROXY_BLOCK_DEFAULT
    extra: list[str] = []
    if args.proxy_block_size:
        from hikkoshi.cli.nbd_proxy import parse_size as proxy_size

        block_size = proxy_size(args.proxy_block_size)
        extra = ["--block-size", args.proxy_block_size]
    return Settings(
        sections=list(args.only),
        quick=quick,
        repeat=repeat,
        size=args.size if args.size is not None else ((256 if quick else 1024) * MIB),
        wan_size=args.wan_size if args.wan_size is not None else ((32 if quick else 256) * MIB),
        fs_size=fs_size,
        fs_data=fs_data,
        runtime_s=runtime,
        ramp_s=0 if quick else 1,
        wan_delay=args.wan_delay,
        wan_rate=args.wan_rate,
        wan_rate_bps=rate_bps,
        latency_blocks=args.latency_blocks if args.latency_blocks is not None else (30 if quick else 100),
        latency_rounds=max(1, args.latency_rounds),
        proxy_extra=extra,
        proxy_block_size=block_size,
        verify=not args.no_verify,
        workdir=Path(args.workdir).resolve(),
        output_dir=Path(args.output_dir).resolve(),
        hikkoshi=Path(args.hikkoshi).absolute(),
    )


# --- machine facts --------------------------------------------------------------------------------------


def tool_versions() -> dict[str, Any]:
    rev = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    status = _command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"])
    return {
        "fio": tool_version(("fio", "--version")),
        "nbdcopy": tool_version(("nbdcopy", "--version")),
        "mke2fs": tool_version(("mke2fs", "-V")),
        "hikkoshi": {"git_rev": rev, "src_dirty": bool(status) if status is not None else None},
    }


# --- the run --------------------------------------------------------------------------------------------


def _mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds if seconds > 0 else 0.0


def _size_arg(size: int) -> str:
    return f"{size >> 30}G" if size % (1 << 30) == 0 else f"{size >> 20}M"


class Bench:
    """State of one run: settings, where things go, and the records."""

    def __init__(self, settings: Settings, stamp: str) -> None:
        self.s = settings
        self.stamp = stamp
        self.dir = settings.workdir / "proxy"
        self.logs = settings.workdir / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.images: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.errors: list[dict[str, Any]] = []
        self.commands: dict[str, list[str]] = {}
        self.section_settings: dict[str, dict[str, Any]] = {}
        self.wan_cli = False

    # -- processes -----------------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.logs / f"proxy-{self.stamp}-{name}.log"

    @contextmanager
    def source(self, image: Path) -> Iterator[Daemon]:
        with Daemon("source", source_argv(self.s.hikkoshi, image), self.log_path("source")) as d:
            d.start()
            self.commands.setdefault("source", d.argv)
            yield d

    @contextmanager
    def proxy(self, upstream: str, extra: list[str], tag: str) -> Iterator[tuple[Daemon, Path, Path]]:
        """A proxy on a fresh cache; yields (daemon, control socket, cache file); removes the cache."""
        cache = self.dir / f"cache-{tag}.raw"
        control = self.dir / f"ctl-{tag}.sock"
        remove_cache(cache)
        argv = proxy_argv(self.s.hikkoshi, upstream, cache, control, [*self.s.proxy_extra, *extra])
        try:
            with Daemon("proxy", argv, self.log_path("proxy")) as d:
                d.start()
                yield d, control, cache
        finally:
            remove_cache(cache)

    @contextmanager
    def relay(self, to_port: int) -> Iterator[Daemon]:
        argv = wan_argv(self.s.hikkoshi if self.wan_cli else None, to_port, self.s.wan_delay, self.s.wan_rate)
        with Daemon("wan", argv, self.log_path("wan")) as d:
            d.start()
            yield d

    # -- records ------------------------------------------------------------------------------------

    def record(self, section: str, case: str, repeat: int, value: float, unit: str, **fields: Any) -> None:
        rec: dict[str, Any] = {
            "section": section,
            "case": case,
            "repeat": repeat,
            "value": value,
            "unit": unit,
        }
        rec.update(fields)
        self.runs.append(rec)
        log(f"  [{section} r{repeat + 1}] {case}: {_fmt(value)} {unit}")

    def values(self, section: str, case: str, key: str = "value") -> list[float]:
        out: list[float] = []
        for r in self.runs:
            if r["section"] == section and r["case"] == case:
                v = _dig(r, key)
                if isinstance(v, int | float):
                    out.append(float(v))
        return out

    def median(self, section: str, case: str, key: str = "value") -> float | None:
        vals = self.values(section, case, key)
        return statistics.median(vals) if vals else None

    def cell(self, section: str, case: str, key: str = "value", digits: int = 1) -> str:
        vals = self.values(section, case, key)
        if not vals:
            return "—"
        text = _fmt(statistics.median(vals), digits)
        if len(vals) > 1:
            text += f" ({_fmt(min(vals), digits)}..{_fmt(max(vals), digits)})"
        return text

    def ratio(self, a: tuple[str, str, str], b: tuple[str, str, str]) -> float | None:
        x = self.median(*a)
        y = self.median(*b)
        if x is None or y is None or y <= 0:
            return None
        return x / y

    def check(self, name: str, result: dict[str, Any]) -> None:
        result = {"check": name, **result}
        self.checks.append(result)
        log(f"  check {name}: {'ok' if result.get('ok') else 'FAILED'}")

    def guard(self, section: str, what: str, repeat: int, fn: Callable[[], None]) -> None:
        """Run one measurement; an error in it is recorded and the run goes on."""
        try:
            fn()
        except (JobError, ClientError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
            message = f"{type(exc).__name__}: {exc}"
            self.errors.append({"section": section, "what": what, "repeat": repeat, "error": message})
            log(f"  [{section} r{repeat + 1}] {what}: ERROR {message}")
        time.sleep(PAUSE_S)

    # -- images -------------------------------------------------------------------------------------

    def zero_image(self, size: int) -> Path:
        """`size` bytes of written (allocated, not sparse) zeroes."""
        path = self.s.workdir / f"proxy-zeros-{size}.raw"
        created = False
        if not path.exists() or path.stat().st_size != size or allocated_bytes(path) < size:
            created = True
            tmp = path.with_name(path.name + ".tmp")
            block = bytes(8 << 20)
            with open(tmp, "wb") as f:
                left = size
                while left:
                    left -= f.write(block[: min(left, len(block))])
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        warm = warm_page_cache(path)
        self.images["zeros"] = {
            "path": str(path),
            "size": size,
            "fill": "written zeroes (allocated)",
            "allocated_bytes": allocated_bytes(path),
            "created_this_run": created,
            "warm_read_s": round(warm, 3),
        }
        return path

    def random_image(self, name: str, size: int) -> Path:
        path = self.s.workdir / f"proxy-{name}-{size}.raw"
        created = ensure_filled_file(path, size)
        warm = warm_page_cache(path)
        self.images[name] = {
            "path": str(path),
            "size": size,
            "fill": "os.urandom",
            "created_this_run": created,
        }
        self.images[name]["warm_read_s"] = round(warm, 3)
        return path

    # -- section 1 and 2: reads -----------------------------------------------------------------------

    def section_read(self) -> None:
        s = self.s
        image = self.random_image("random", s.size)
        sha = sha256_file(image) if s.verify else None
        for r in range(s.repeat):
            log(f"read: repeat {r + 1}/{s.repeat}")
            order = ["proxy", "direct"] if r % 2 == 0 else ["direct", "proxy"]
            for who in order:
                if who == "proxy":
                    self.guard("read", "proxy nbdcopy", r, partial(self._proxy_nbdcopy, image, r, sha))
                else:
                    self.guard("read", "direct nbdcopy", r, partial(self._direct_nbdcopy, image, r))
            for who in order:
                if who == "proxy":
                    self.guard("read", "proxy fio", r, partial(self._proxy_fio_seq, image, r))
                else:
                    self.guard("read", "direct fio", r, partial(self._direct_fio_seq, image, r))

    def _cpu(self, d: Daemon) -> float:
        try:
            return d.cpu_seconds()
        except (OSError, JobError):
            return float("nan")

    def _proxy_nbdcopy(self, image: Path, r: int, sha: str | None) -> None:
        s = self.s
        with (
            self.source(image) as src,
            self.proxy(src.uri(SOURCE_EXPORT), ["--no-background"], "read") as (px, control, cache),
        ):
            # Let the proxy finish mapping the source (block status, file system probe) first.
            wait_detached(px, control, 60, until_phase="on-demand only")
            cpu_px, cpu_src = self._cpu(px), self._cpu(src)
            load = os.getloadavg()[0]
            seconds, argv = nbdcopy_read(px.uri())
            t_end = time.perf_counter()
            cpu_px, cpu_src = self._cpu(px) - cpu_px, self._cpu(src) - cpu_src
            self.commands.setdefault("proxy --no-background", px.argv)
            self.commands.setdefault("nbdcopy", argv)
            progress = wait_detached(px, control, 300)
            assert progress.t_detached is not None
            status = progress.final
            self.record(
                "read",
                "cold-nbdcopy",
                r,
                _mib_s(s.size, seconds),
                "MiB/s",
                seconds=round(seconds, 3),
                proxy_cpu_pct=round(100 * cpu_px / seconds, 1),
                source_cpu_pct=round(100 * cpu_src / seconds, 1),
                loadavg_1m=load,
                detach_after_s=round(progress.t_detached - t_end, 3),
                fetched_demand_bytes=status["fetched_demand_bytes"],
                reads_fetched=status["reads_fetched"],
                commands={"proxy": px.argv, "client": argv},
            )
            self.record("read", "detach-after-cold", r, round(progress.t_detached - t_end, 3), "s")
            cpu_px = self._cpu(px)
            seconds, argv = nbdcopy_read(px.uri())
            cpu_px = self._cpu(px) - cpu_px
            self.record(
                "read",
                "warm-nbdcopy",
                r,
                _mib_s(s.size, seconds),
                "MiB/s",
                seconds=round(seconds, 3),
                proxy_cpu_pct=round(100 * cpu_px / seconds, 1),
                loadavg_1m=os.getloadavg()[0],
                commands={"proxy": px.argv, "client": argv},
            )
            out = self.dir / "fio-randread.json"
            fio = fio_argv(
                "randread-4k", px.uri(), "randread", "4k", 32, out, runtime_s=s.runtime_s, ramp_s=s.ramp_s
            )
            res = run_fio(fio, out, ("read",), s.runtime_s + s.ramp_s + 120)
            self.record(
                "read",
                "warm-randread4k",
                r,
                res["read"]["iops"],
                "IOPS",
                p50_us=res["read"]["clat_p50_us"],
                p99_us=res["read"]["clat_p99_us"],
                fio=res,
                loadavg_1m=os.getloadavg()[0],
                commands={"proxy": px.argv, "client": fio},
            )
            px.check_alive()
            px.stop()
            if sha is not None and r == 0:
                self.check(
                    "read: cache after the cold read equals the source", {"ok": sha256_file(cache) == sha}
                )

    def _direct_nbdcopy(self, image: Path, r: int) -> None:
        with self.source(image) as src:
            self._direct_nbdcopy_on(src, src.uri(SOURCE_EXPORT), r)

    def _direct_nbdcopy_on(self, src: Daemon, uri: str, r: int) -> None:
        s = self.s
        cpu_src = self._cpu(src)
        load = os.getloadavg()[0]
        seconds, argv = nbdcopy_read(uri)
        cpu_src = self._cpu(src) - cpu_src
        self.record(
            "read",
            "direct-nbdcopy",
            r,
            _mib_s(s.size, seconds),
            "MiB/s",
            seconds=round(seconds, 3),
            source_cpu_pct=round(100 * cpu_src / seconds, 1),
            loadavg_1m=load,
            commands={"source": src.argv, "client": argv},
        )
        out = self.dir / "fio-randread.json"
        fio = fio_argv("randread-4k", uri, "randread", "4k", 32, out, runtime_s=s.runtime_s, ramp_s=s.ramp_s)
        res = run_fio(fio, out, ("read",), s.runtime_s + s.ramp_s + 120)
        self.record(
            "read",
            "direct-randread4k",
            r,
            res["read"]["iops"],
            "IOPS",
            p50_us=res["read"]["clat_p50_us"],
            p99_us=res["read"]["clat_p99_us"],
            fio=res,
            loadavg_1m=os.getloadavg()[0],
            commands={"source": src.argv, "client": fio},
        )

    def _proxy_fio_seq(self, image: Path, r: int) -> None:
        out = self.dir / "fio-seq.json"
        with (
            self.source(image) as src,
            self.proxy(src.uri(SOURCE_EXPORT), ["--no-background"], "read") as (px, control, _cache),
        ):
            wait_detached(px, control, 60, until_phase="on-demand only")
            fio = fio_argv("seqread-1m", px.uri(), "read", "1m", 8, out)
            cpu_px = self._cpu(px)
            res = run_fio(fio, out, ("read",), 900)
            cpu_px = self._cpu(px) - cpu_px
            secs = res["read"]["runtime_ms"] / 1000
            self.record(
                "read",
                "cold-fio-seq1m",
                r,
                res["read"]["bw_bytes_per_s"] / MIB,
                "MiB/s",
                proxy_cpu_pct=round(100 * cpu_px / secs, 1) if secs else None,
                fio=res,
                loadavg_1m=os.getloadavg()[0],
                commands={"proxy": px.argv, "client": fio},
            )
            wait_detached(px, control, 300)
            res = run_fio(fio, out, ("read",), 900)
            self.record(
                "read",
                "warm-fio-seq1m",
                r,
                res["read"]["bw_bytes_per_s"] / MIB,
                "MiB/s",
                fio=res,
                loadavg_1m=os.getloadavg()[0],
                commands={"proxy": px.argv, "client": fio},
            )

    def _direct_fio_seq(self, image: Path, r: int) -> None:
        out = self.dir / "fio-seq.json"
        with self.source(image) as src:
            fio = fio_argv("seqread-1m", src.uri(SOURCE_EXPORT), "read", "1m", 8, out)
            res = run_fio(fio, out, ("read",), 900)
        self.record(
            "read",
            "direct-fio-seq1m",
            r,
            res["read"]["bw_bytes_per_s"] / MIB,
            "MiB/s",
            fio=res,
            loadavg_1m=os.getloadavg()[0],
            commands={"client": fio},
        )

    # -- section 3: relocation on loopback ------------------------------------------------------------

    def section_relocate(self) -> None:
        s = self.s
        image = self.random_image("random", s.size)
        sha = sha256_file(image) if s.verify else None
        zeros = self.zero_image(s.size)
        for r in range(s.repeat):
            log(f"relocate: repeat {r + 1}/{s.repeat}")
            order = ["idle", "busy"] if r % 2 == 0 else ["busy", "idle"]
            for which in order:
                if which == "idle":
                    self.guard("relocate", "idle", r, partial(self._relocate_idle, image, r, sha, "idle"))
                else:
                    self.guard("relocate", "busy", r, partial(self._relocate_busy, image, r))
            # Allocated zeroes: the source says "data", so every block is fetched and found to be zero.
            self.guard(
                "relocate", "idle-zeros", r, partial(self._relocate_idle, zeros, r, None, "idle-zeros")
            )

    def _relocation_fields(self, px: Daemon, progress: Any, size: int) -> dict[str, Any]:
        assert progress.t_detached is not None
        total = progress.t_detached - px.t_start
        status = progress.final
        return {
            "from_start_s": round(total, 3),
            "from_ready_s": round(progress.t_detached - px.t_ready, 3),
            "startup_s": round(px.t_ready - px.t_start, 3),
            "all_local_from_start_s": (
                round(progress.t_all_local - px.t_start, 3) if progress.t_all_local is not None else None
            ),
            "mib_s_from_start": round(_mib_s(size, total), 2),
            "status": status,
            "polls": progress.polls,
            "samples": thin_samples(progress.samples),
        }

    def _relocate_idle(self, image: Path, r: int, sha: str | None, case: str) -> None:
        s = self.s
        load = os.getloadavg()[0]
        with self.source(image) as src:
            cpu_src = self._cpu(src)
            with self.proxy(src.uri(SOURCE_EXPORT), [], "reloc") as (px, control, cache):
                progress = wait_detached(px, control, 600)
                fields = self._relocation_fields(px, progress, s.size)
                cpu_px = self._cpu(px)
                cpu_src = self._cpu(src) - cpu_src
                self.commands.setdefault("proxy", px.argv)
                self.record(
                    "relocate",
                    case,
                    r,
                    fields["from_start_s"],
                    "s",
                    **fields,
                    loadavg_1m=load,
                    proxy_cpu_s=round(cpu_px, 2),
                    source_cpu_s=round(cpu_src, 2),
                    commands={"proxy": px.argv},
                )
                px.check_alive()
                px.stop()
                if sha is not None and r == 0:
                    self.check(
                        "relocate: cache after an idle relocation equals the source",
                        {"ok": sha256_file(cache) == sha},
                    )

    def _relocate_busy(self, image: Path, r: int) -> None:
        s = self.s
        load = os.getloadavg()[0]
        out = self.dir / "fio-randrw.json"
        with (
            self.source(image) as src,
            self.proxy(src.uri(SOURCE_EXPORT), [], "reloc") as (px, control, _cache),
        ):
            fio = fio_argv("randrw-4k", px.uri(), "randrw", "4k", 8, out, runtime_s=3600)
            with BackgroundFio(fio, out, ("read", "write")) as bg:
                progress = wait_detached(px, control, 900)
                res = bg.stop()
            fields = self._relocation_fields(px, progress, s.size)
            iops = res["read"]["iops"] + res["write"]["iops"]
            self.record(
                "relocate",
                "busy",
                r,
                fields["from_start_s"],
                "s",
                **fields,
                loadavg_1m=load,
                fio_iops=round(iops),
                read_p50_us=res["read"]["clat_p50_us"],
                read_p99_us=res["read"]["clat_p99_us"],
                write_p50_us=res["write"]["clat_p50_us"],
                write_p99_us=res["write"]["clat_p99_us"],
                fio=res,
                commands={"proxy": px.argv, "client": fio},
            )
            # The same load on the finished (detached, all local) proxy: what the guest gets afterwards.
            base = fio_argv(
                "randrw-4k", px.uri(), "randrw", "4k", 8, out, runtime_s=s.runtime_s, ramp_s=s.ramp_s
            )
            res = run_fio(base, out, ("read", "write"), s.runtime_s + s.ramp_s + 120)
            iops = res["read"]["iops"] + res["write"]["iops"]
            self.record(
                "relocate",
                "busy-baseline",
                r,
                round(iops),
                "IOPS",
                read_p50_us=res["read"]["clat_p50_us"],
                read_p99_us=res["read"]["clat_p99_us"],
                write_p50_us=res["write"]["clat_p50_us"],
                write_p99_us=res["write"]["clat_p99_us"],
                fio=res,
                loadavg_1m=os.getloadavg()[0],
                commands={"proxy": px.argv, "client": base},
            )
            px.check_alive()

    # -- section 4: across the WAN emulator -----------------------------------------------------------

    def section_wan(self) -> None:
        s = self.s
        reason = wan_importable()
        if reason is not None:
            self.skipped["wan"] = reason
            log(f"wan: not run ({reason})")
            return
        self.wan_cli = wan_cli_registered(s.hikkoshi)
        image = self.random_image("wan", s.wan_size)
        sha = sha256_file(image) if s.verify else None
        ideal = s.wan_size * 8 / s.wan_rate_bps
        self.images["wan"]["ideal_transfer_s"] = round(ideal, 3)
        for r in range(s.repeat):
            log(f"wan: repeat {r + 1}/{s.repeat} (ideal transfer {ideal:.1f} s)")
            self.guard("wan", "relocation", r, partial(self._wan_relocate, image, r, ideal, sha))
            self.guard("wan", "nbdcopy", r, partial(self._wan_nbdcopy, image, r, ideal))
            self.guard("wan", "latency", r, partial(self._wan_latency, image, r, False))
            self.guard("wan", "latency-during-copy", r, partial(self._wan_latency, image, r, True))

    @contextmanager
    def wan_path(self, image: Path) -> Iterator[tuple[Daemon, Daemon]]:
        """A fresh source server and a fresh relay in front of it."""
        with self.source(image) as src, self.relay(src.port) as relay:
            self.commands.setdefault("wan", self._wan_command(relay))
            yield src, relay

    def _wan_command(self, relay: Daemon) -> list[str]:
        """The relay's command as run, or as `hikkoshi wan ...` when it ran through the shim."""
        return list(relay.argv) if self.wan_cli else ["hikkoshi", *relay.argv[3:]]

    def _wan_relocate(self, image: Path, r: int, ideal: float, sha: str | None) -> None:
        s = self.s
        with self.wan_path(image) as (_src, relay):
            with self.proxy(relay.uri(SOURCE_EXPORT), [], "wan") as (px, control, cache):
                progress = wait_detached(px, control, max(600.0, 20 * ideal))
                fields = self._relocation_fields(px, progress, s.wan_size)
                px.check_alive()
                px.stop()
                if sha is not None and r == 0:
                    self.check(
                        "wan: cache after relocation equals the source", {"ok": sha256_file(cache) == sha}
                    )
            relay.stop()
            totals = wan_totals(relay)
        self.record(
            "wan",
            "relocation",
            r,
            fields["from_start_s"],
            "s",
            **fields,
            ideal_s=round(ideal, 3),
            achieved_over_ideal=round(ideal / fields["from_start_s"], 3),
            achieved_over_ideal_from_ready=round(ideal / fields["from_ready_s"], 3),
            wan=totals,
            loadavg_1m=os.getloadavg()[0],
            commands={"proxy": px.argv, "wan": self._wan_command(relay)},
        )

    def _wan_nbdcopy(self, image: Path, r: int, ideal: float) -> None:
        with self.wan_path(image) as (_src, relay):
            seconds, argv = nbdcopy_read(relay.uri(SOURCE_EXPORT))
            relay.stop()
            totals = wan_totals(relay)
        self.record(
            "wan",
            "nbdcopy",
            r,
            round(seconds, 3),
            "s",
            ideal_s=round(ideal, 3),
            achieved_over_ideal=round(ideal / seconds, 3),
            wan=totals,
            loadavg_1m=os.getloadavg()[0],
            commands={"client": argv, "wan": self._wan_command(relay)},
        )

    def _wan_latency(self, image: Path, r: int, during_copy: bool) -> None:
        """4 KiB reads of missing and present blocks; with --no-background, or while the copy runs.

        During the copy, the blocks probed lie in the last quarter of the disk, which the copy (in disk
        order: the source is fresh, so it has no heat, and the image holds no file system) reaches last;
        the status after the probe tells whether the copy's front was still behind them.
        """
        s = self.s
        extra = [] if during_copy else ["--no-background"]
        blocks = max(5, s.latency_blocks // 5) if during_copy else s.latency_blocks
        rounds = 3 if during_copy else s.latency_rounds
        region = (0.75, 1.0) if during_copy else (0.0, 1.0)
        with (
            self.wan_path(image) as (_src, relay),
            self.proxy(relay.uri(SOURCE_EXPORT), extra, "wanlat") as (px, control, _cache),
        ):
            wait_detached(px, control, 120, until_phase="copying" if during_copy else "on-demand only")
            before = control_request(control, "status")
            probe = read_latency_probe(
                px.uri(), image, s.proxy_block_size, blocks, rounds, seed=1000 + r, region=region
            )
            status = control_request(control, "status")
            px.check_alive()
        case = "latency-during-copy" if during_copy else "latency"
        own = probe["blocks"] * s.proxy_block_size
        self.record(
            "wan",
            case,
            r,
            probe["missing"]["p50_ms"],
            "ms",
            missing_p50_ms=probe["missing"]["p50_ms"],
            missing_p99_ms=probe["missing"]["p99_ms"],
            present_p50_ms=probe["present"]["p50_ms"],
            present_p99_ms=probe["present"]["p99_ms"],
            probe_seconds=probe["seconds"],
            # Were the probed blocks still ahead of the copy? Its front is at most what is present, less
            # what the probe itself fetched (the copy goes in disk order).
            copy_front_bytes_at_end=status["present_bytes"] - own,
            probe_region_start_bytes=int(region[0] * s.wan_size),
            probe=probe,
            status_before=before,
            status=status,
            loadavg_1m=os.getloadavg()[0],
            commands={"proxy": px.argv, "wan": self._wan_command(relay), "client": ["NbdClient"]},
        )
        if probe["mismatches"]:
            self.check(
                f"wan: 4 KiB reads through the proxy equal the source ({case})",
                {"ok": False, "mismatches": probe["mismatches"]},
            )

    # -- section 5: ext4, free space skipped -------------------------------------------------------------

    def build_fs_images(self) -> tuple[Path, Path, Path, list[tuple[str, int]]]:
        s = self.s
        tag = f"{s.fs_size}-{s.fs_data}"
        srcdir = s.workdir / f"proxy-fs-files-{s.fs_data}"
        garbage = s.workdir / f"proxy-fs-garbage-{tag}.raw"
        sparse = s.workdir / f"proxy-fs-sparse-{tag}.raw"
        marker = s.workdir / f"proxy-fs-{tag}.json"
        size_arg = _size_arg(s.fs_size)
        try:
            facts: dict[str, Any] = json.loads(marker.read_text())
            reuse = (
                garbage.exists() and sparse.exists() and srcdir.is_dir() and facts.get("fs_size") == s.fs_size
            )
        except (OSError, ValueError):
            reuse = False
        if not reuse:
            log(f"fs: building ext4 images ({s.fs_data >> 20} MiB of files in {s.fs_size >> 20} MiB)")
            marker.unlink(missing_ok=True)
            shutil.rmtree(srcdir, ignore_errors=True)
            files = write_random_tree(srcdir, s.fs_data, seed=5)
            garbage.unlink(missing_ok=True)
            ensure_filled_file(garbage, s.fs_size)
            mkfs_g = ["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", str(srcdir), str(garbage), size_arg]
            run_checked(mkfs_g)
            sparse.unlink(missing_ok=True)
            with open(sparse, "wb") as f:
                f.truncate(s.fs_size)
            mkfs_s = ["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", str(srcdir), str(sparse), size_arg]
            run_checked(mkfs_s)
            facts = {
                "fs_size": s.fs_size,
                "fs_data": s.fs_data,
                "files": files,
                "garbage": {
                    "path": str(garbage),
                    "mkfs": mkfs_g,
                    "prefill": "os.urandom",
                    "allocated_bytes": allocated_bytes(garbage),
                    **ext4_used_bytes(garbage),
                },
                "sparse": {
                    "path": str(sparse),
                    "mkfs": mkfs_s,
                    "prefill": "none (truncate)",
                    "allocated_bytes": allocated_bytes(sparse),
                    **ext4_used_bytes(sparse),
                },
                "built_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            marker.write_text(json.dumps(facts, indent=1) + "\n")
            facts["created_this_run"] = True
        else:
            facts["created_this_run"] = False
        files = [(str(a), int(b)) for a, b in facts["files"]]
        self.images["fs"] = {k: v for k, v in facts.items() if k != "files"} | {"file_count": len(files)}
        warm_page_cache(garbage)
        warm_page_cache(sparse)
        return garbage, sparse, srcdir, files

    def section_fs(self) -> None:
        s = self.s
        garbage, sparse, srcdir, files = self.build_fs_images()
        sha_g = sha256_file(garbage) if s.verify else None
        sha_s = sha256_file(sparse) if s.verify else None
        for r in range(s.repeat):
            log(f"fs: repeat {r + 1}/{s.repeat}")
            for image, kind, sha in ((garbage, "garbage", sha_g), (sparse, "sparse", sha_s)):
                modes = ["skip", "linear"] if r % 2 == 0 else ["linear", "skip"]
                for mode in modes:
                    self.guard(
                        "fs",
                        f"{kind}-{mode}",
                        r,
                        partial(self._fs_relocate, image, kind, mode, r, sha, srcdir, files),
                    )

    def _fs_relocate(
        self,
        image: Path,
        kind: str,
        mode: str,
        r: int,
        sha: str | None,
        srcdir: Path,
        files: list[tuple[str, int]],
    ) -> None:
        s = self.s
        extra = ["--skip-fs-free"] if mode == "skip" else []
        load = os.getloadavg()[0]
        with (
            self.source(image) as src,
            self.proxy(src.uri(SOURCE_EXPORT), extra, "fs") as (px, control, cache),
        ):
            progress = wait_detached(px, control, 600)
            fields = self._relocation_fields(px, progress, s.fs_size)
            px.check_alive()
            px.stop()
            if s.verify and r == 0:
                if mode == "skip":
                    fsck = e2fsck_clean(cache)
                    self.check(f"fs: {kind} --skip-fs-free cache passes e2fsck -fn", fsck)
                    match = files_match(cache, srcdir, files, self.dir / "dump")
                    self.check(f"fs: {kind} --skip-fs-free cache holds every file intact", match)
                elif sha is not None:
                    self.check(
                        f"fs: {kind} linear cache equals the source", {"ok": sha256_file(cache) == sha}
                    )
            cache_alloc = allocated_bytes(cache)
        self.record(
            "fs",
            f"{kind}-{mode}",
            r,
            fields["from_start_s"],
            "s",
            **fields,
            fetched_bytes=_fetched_bytes(fields["status"]),
            loadavg_1m=load,
            cache_allocated_bytes=cache_alloc,
            commands={"proxy": px.argv},
        )

    # -- section 6: ext4, free space skipped, across the WAN emulator -----------------------------------

    def section_fswan(self) -> None:
        s = self.s
        reason = wan_importable()
        if reason is not None:
            self.skipped["fswan"] = reason
            log(f"fswan: not run ({reason})")
            return
        self.wan_cli = wan_cli_registered(s.hikkoshi)
        garbage, _sparse, srcdir, files = self.build_fs_images()
        sha = sha256_file(garbage) if s.verify else None
        self.section_settings["fswan"] = {
            "image": str(garbage),
            "fs_size": s.fs_size,
            "fs_data": s.fs_data,
            "wan_delay_each_way": s.wan_delay,
            "wan_rate_each_way": s.wan_rate,
            "wan_rate_bps": s.wan_rate_bps,
            "ideal": "fetched bytes * 8 / wan_rate_bps",
            "linear_ideal_s": round(s.fs_size * 8 / s.wan_rate_bps, 3),
        }
        for r in range(s.repeat):
            log(f"fswan: repeat {r + 1}/{s.repeat} ({s.wan_delay} each way, {s.wan_rate})")
            for mode in ["skip", "linear"] if r % 2 == 0 else ["linear", "skip"]:
                self.guard(
                    "fswan", mode, r, partial(self._fswan_relocate, garbage, mode, r, sha, srcdir, files)
                )

    def _fswan_relocate(
        self, image: Path, mode: str, r: int, sha: str | None, srcdir: Path, files: list[tuple[str, int]]
    ) -> None:
        s = self.s
        extra = ["--skip-fs-free"] if mode == "skip" else []
        load = os.getloadavg()[0]
        timeout = max(600.0, 20 * s.fs_size * 8 / s.wan_rate_bps)
        with self.wan_path(image) as (_src, relay):
            with self.proxy(relay.uri(SOURCE_EXPORT), extra, "fswan") as (px, control, cache):
                progress = wait_detached(px, control, timeout)
                fields = self._relocation_fields(px, progress, s.fs_size)
                px.check_alive()
                px.stop()
                if s.verify and r == 0:
                    if mode == "skip":
                        fsck = e2fsck_clean(cache)
                        self.check("fswan: garbage --skip-fs-free cache passes e2fsck -fn", fsck)
                        match = files_match(cache, srcdir, files, self.dir / "dump-wan")
                        self.check("fswan: garbage --skip-fs-free cache holds every file intact", match)
                    elif sha is not None:
                        self.check(
                            "fswan: garbage linear cache equals the source", {"ok": sha256_file(cache) == sha}
                        )
            relay.stop()
            totals = wan_totals(relay)
        fetched = _fetched_bytes(fields["status"])
        ideal = fetched * 8 / s.wan_rate_bps
        self.record(
            "fswan",
            mode,
            r,
            fields["from_start_s"],
            "s",
            **fields,
            fetched_bytes=fetched,
            ideal_s=round(ideal, 3),
            achieved_over_ideal=round(ideal / fields["from_start_s"], 3),
            achieved_over_ideal_from_ready=round(ideal / fields["from_ready_s"], 3),
            wan_delay_each_way=s.wan_delay,
            wan_rate_each_way=s.wan_rate,
            wan=totals,
            loadavg_1m=load,
            commands={"proxy": px.argv, "wan": self._wan_command(relay)},
        )


def _fetched_bytes(status: Any) -> int:
    """Bytes the proxy fetched from its upstream (background copy and demand reads)."""
    if not isinstance(status, dict):
        return 0
    return int(status.get("fetched_background_bytes") or 0) + int(status.get("fetched_demand_bytes") or 0)


def _dig(record: dict[str, Any], key: str) -> Any:
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _ratio(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


# --- report ---------------------------------------------------------------------------------------------


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _floor_cold(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{'PASS' if v >= COLD_FLOOR_MIB_S else 'FAIL'} (≥ {COLD_FLOOR_MIB_S:.0f})"


def _floor_warm(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{'PASS' if x >= WARM_FLOOR_RATIO else 'FAIL'} (≥ {WARM_FLOOR_RATIO:.2f})"


def _report_read(b: Bench) -> list[str]:
    c = b.cell

    def pair(proxy: str, direct: str) -> tuple[str, str, float | None]:
        return (
            c("read", proxy),
            c("read", direct),
            b.ratio(("read", proxy, "value"), ("read", direct, "value")),
        )

    cn, dn, r_cn = pair("cold-nbdcopy", "direct-nbdcopy")
    cf, df, r_cf = pair("cold-fio-seq1m", "direct-fio-seq1m")
    wn, _, r_wn = pair("warm-nbdcopy", "direct-nbdcopy")
    wf, _, r_wf = pair("warm-fio-seq1m", "direct-fio-seq1m")
    r_wr = b.ratio(("read", "warm-randread4k", "value"), ("read", "direct-randread4k", "value"))
    lat_w = f"{c('read', 'warm-randread4k', 'p50_us', 0)} / {c('read', 'warm-randread4k', 'p99_us', 0)}"
    lat_d = f"{c('read', 'direct-randread4k', 'p50_us', 0)} / {c('read', 'direct-randread4k', 'p99_us', 0)}"
    return [
        f"### 1-2. Reads through the proxy ({b.s.size >> 20} MiB random data, proxy --no-background)",
        "",
        _row("read", "unit", "through proxy", "direct from source", "proxy/direct", "floor"),
        "|---|---|--:|--:|--:|---|",
        _row(
            "cold, nbdcopy → null:",
            "MiB/s",
            cn,
            dn,
            _ratio(r_cn),
            _floor_cold(b.median("read", "cold-nbdcopy")),
        ),
        _row(
            "cold, fio seq 1M qd8",
            "MiB/s",
            cf,
            df,
            _ratio(r_cf),
            _floor_cold(b.median("read", "cold-fio-seq1m")),
        ),
        _row("warm, nbdcopy → null:", "MiB/s", wn, dn, _ratio(r_wn), _floor_warm(r_wn)),
        _row("warm, fio seq 1M qd8", "MiB/s", wf, df, _ratio(r_wf), _floor_warm(r_wf)),
        _row(
            "warm, fio randread 4k qd32",
            "IOPS",
            c("read", "warm-randread4k", digits=0),
            c("read", "direct-randread4k", digits=0),
            _ratio(r_wr),
            _floor_warm(r_wr),
        ),
        _row("warm, randread 4k clat p50 / p99", "µs", lat_w, lat_d, "", ""),
        "",
        f"Proxy CPU during the cold nbdcopy: {c('read', 'cold-nbdcopy', 'proxy_cpu_pct', 0)} % of one core "
        f"(source server {c('read', 'cold-nbdcopy', 'source_cpu_pct', 0)} %; reading the source directly, "
        f"{c('read', 'direct-nbdcopy', 'source_cpu_pct', 0)} %). The upstream was detached "
        f"{c('read', 'detach-after-cold', digits=2)} s after the cold read ended (the cache's flush).",
        "",
    ]


def _report_relocate(b: Bench) -> list[str]:
    c = b.cell
    idle = b.median("relocate", "idle")
    busy = b.median("relocate", "busy")
    slow = None if idle is None or busy is None or idle <= 0 else busy / idle
    r_io = b.ratio(("relocate", "busy", "fio_iops"), ("relocate", "busy-baseline", "value"))

    def lat(case: str, direction: str) -> str:
        p50 = c("relocate", case, f"{direction}_p50_us", 0)
        return f"{p50} / {c('relocate', case, f'{direction}_p99_us', 0)}"

    return [
        f"### 3. Full relocation on loopback ({b.s.size >> 20} MiB random data, background copy)",
        "",
        _row("relocation", "start → detached (s)", "ready → detached (s)", "MiB/s (from start)", "vs idle"),
        "|---|--:|--:|--:|--:|",
        _row(
            "idle",
            c("relocate", "idle", digits=2),
            c("relocate", "idle", "from_ready_s", 2),
            c("relocate", "idle", "mib_s_from_start"),
            "1.00",
        ),
        _row(
            "idle, image of allocated zeroes",
            c("relocate", "idle-zeros", digits=2),
            c("relocate", "idle-zeros", "from_ready_s", 2),
            c("relocate", "idle-zeros", "mib_s_from_start"),
            _ratio(b.ratio(("relocate", "idle-zeros", "value"), ("relocate", "idle", "value"))),
        ),
        _row(
            "busy (fio randrw 4k qd8 through the proxy)",
            c("relocate", "busy", digits=2),
            c("relocate", "busy", "from_ready_s", 2),
            c("relocate", "busy", "mib_s_from_start"),
            _ratio(slow),
        ),
        "",
        _row("guest fio randrw 4k qd8", "IOPS (r+w)", "read p50 / p99 (µs)", "write p50 / p99 (µs)"),
        "|---|--:|--:|--:|",
        _row(
            "during relocation",
            c("relocate", "busy", "fio_iops", 0),
            lat("busy", "read"),
            lat("busy", "write"),
        ),
        _row(
            f"after (all local, {b.s.runtime_s} s)",
            c("relocate", "busy-baseline", digits=0),
            lat("busy-baseline", "read"),
            lat("busy-baseline", "write"),
        ),
        "",
        f"Guest IOPS during relocation / after: {_ratio(r_io)}.",
        "",
    ]


def _report_wan(b: Bench) -> list[str]:
    s = b.s
    c = b.cell
    if "wan" in b.skipped:
        return ["### 4. Across the WAN emulator", "", f"Not run: {b.skipped['wan']}", ""]
    ideal = _fmt(s.wan_size * 8 / s.wan_rate_bps, 2) if s.wan_rate_bps > 0 else "—"
    during = [r for r in b.runs if r["section"] == "wan" and r["case"] == "latency-during-copy"]
    ahead = (
        "—"
        if not during
        else ", ".join(
            "no" if r["copy_front_bytes_at_end"] >= r["probe_region_start_bytes"] else "yes" for r in during
        )
    )
    return [
        f"### 4. Across the WAN emulator ({s.wan_delay} and {s.wan_rate} each way; "
        f"{s.wan_size >> 20} MiB random data)",
        "",
        _row("over the WAN", "seconds", "ideal (bytes / rate)", "achieved / ideal"),
        "|---|--:|--:|--:|",
        _row(
            "proxy relocation, start → detached",
            c("wan", "relocation", digits=2),
            ideal,
            c("wan", "relocation", "achieved_over_ideal", 2),
        ),
        _row(
            "proxy relocation, ready → detached",
            c("wan", "relocation", "from_ready_s", 2),
            ideal,
            c("wan", "relocation", "achieved_over_ideal_from_ready", 2),
        ),
        _row(
            "nbdcopy source → null: (reference)",
            c("wan", "nbdcopy", digits=2),
            ideal,
            c("wan", "nbdcopy", "achieved_over_ideal", 2),
        ),
        "",
        _row("guest 4 KiB read (NbdClient, one at a time)", "p50 (ms)", "p99 (ms)"),
        "|---|--:|--:|",
        _row(
            "present block",
            c("wan", "latency", "present_p50_ms", 3),
            c("wan", "latency", "present_p99_ms", 3),
        ),
        _row(
            "missing block (--no-background)",
            c("wan", "latency", "missing_p50_ms", 2),
            c("wan", "latency", "missing_p99_ms", 2),
        ),
        _row(
            "present block, background copy running",
            c("wan", "latency-during-copy", "present_p50_ms", 3),
            c("wan", "latency-during-copy", "present_p99_ms", 3),
        ),
        _row(
            "missing block ahead of the running background copy",
            c("wan", "latency-during-copy", "missing_p50_ms", 2),
            c("wan", "latency-during-copy", "missing_p99_ms", 2),
        ),
        "",
        f"Probed blocks still ahead of the background copy when the probe ended (per repeat): {ahead}.",
        "",
    ]


def _report_fs(b: Bench) -> list[str]:
    s = b.s
    used = b.images["fs"].get("garbage", {}).get("used_bytes")
    pct = f"{100 * used / s.fs_size:.0f} %" if isinstance(used, int) else "?"
    lines = [
        f"### 5. ext4 image, {s.fs_data >> 20} MiB of files in {s.fs_size >> 20} MiB "
        f"(the file system uses {pct}, per dumpe2fs)",
        "",
        _row(
            "image", "proxy", "start → detached (s)", "ready → detached (s)", "fetched (MiB)", "zeroed (MiB)"
        ),
        "|---|---|--:|--:|--:|--:|",
    ]
    for kind in ("garbage", "sparse"):
        for mode, flag in (("skip", "--skip-fs-free"), ("linear", "(none)")):
            case = f"{kind}-{mode}"
            fetched = b.median("fs", case, "status.fetched_background_bytes")
            demand = b.median("fs", case, "status.fetched_demand_bytes")
            zero = b.median("fs", case, "status.zero_bytes")
            total = None if fetched is None else (fetched + (demand or 0)) / MIB
            what = "free space = random garbage" if kind == "garbage" else "sparse file"
            zero_mib = None if zero is None else zero / MIB
            lines.append(
                _row(
                    what,
                    flag,
                    b.cell("fs", case, digits=2),
                    b.cell("fs", case, "from_ready_s", 2),
                    _fmt(total),
                    _fmt(zero_mib),
                )
            )
    r_g = b.ratio(("fs", "garbage-linear", "value"), ("fs", "garbage-skip", "value"))
    r_g_ready = b.ratio(("fs", "garbage-linear", "from_ready_s"), ("fs", "garbage-skip", "from_ready_s"))
    r_s = b.ratio(("fs", "sparse-linear", "value"), ("fs", "sparse-skip", "value"))
    r_gs = b.ratio(("fs", "garbage-linear", "value"), ("fs", "sparse-linear", "value"))
    r_bytes = b.ratio(("fs", "garbage-linear", "fetched_bytes"), ("fs", "garbage-skip", "fetched_bytes"))
    r_used = s.fs_size / used if isinstance(used, int) and used else None
    lines += [
        "",
        f"Garbage image: linear / --skip-fs-free = {_ratio(r_g)} from start, {_ratio(r_g_ready)} from ready; "
        f"bytes fetched linear / --skip-fs-free = {_ratio(r_bytes)} (disk size / used per dumpe2fs: "
        f"{_ratio(r_used)}). Sparse image: linear / --skip-fs-free = "
        f"{_ratio(r_s)}. Garbage linear / sparse linear = {_ratio(r_gs)}.",
        "",
    ]
    return lines


def _report_fswan(b: Bench) -> list[str]:
    s = b.s
    c = b.cell
    title = (
        f"### 6. ext4 image with garbage free space across the WAN emulator "
        f"({s.wan_delay} and {s.wan_rate} each way)"
    )
    if "fswan" in b.skipped:
        return [title, "", f"Not run: {b.skipped['fswan']}", ""]
    lines = [
        title,
        "",
        _row(
            "proxy",
            "start → detached (s)",
            "ready → detached (s)",
            "fetched (MiB)",
            "ideal (fetched / rate, s)",
            "achieved / ideal (from start)",
            "achieved / ideal (from ready)",
        ),
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for mode, flag in (("skip", "--skip-fs-free"), ("linear", "(none)")):
        fetched = b.median("fswan", mode, "fetched_bytes")
        lines.append(
            _row(
                flag,
                c("fswan", mode, digits=2),
                c("fswan", mode, "from_ready_s", 2),
                _fmt(None if fetched is None else fetched / MIB),
                c("fswan", mode, "ideal_s", 2),
                c("fswan", mode, "achieved_over_ideal", 2),
                c("fswan", mode, "achieved_over_ideal_from_ready", 2),
            )
        )
    r_t = b.ratio(("fswan", "linear", "value"), ("fswan", "skip", "value"))
    r_t_ready = b.ratio(("fswan", "linear", "from_ready_s"), ("fswan", "skip", "from_ready_s"))
    r_bytes = b.ratio(("fswan", "linear", "fetched_bytes"), ("fswan", "skip", "fetched_bytes"))
    r_skip_ideal = b.ratio(("fswan", "skip", "value"), ("fswan", "skip", "ideal_s"))
    lines += [
        "",
        f"linear / --skip-fs-free: time {_ratio(r_t)} from start, {_ratio(r_t_ready)} from ready; bytes "
        f"fetched {_ratio(r_bytes)}. --skip-fs-free start → detached / ideal = {_ratio(r_skip_ideal)}.",
        "",
    ]
    return lines


def markdown_report(b: Bench, stamp: str) -> str:
    s = b.s
    lines = [
        f"Relocation proxy, {stamp}, {os.cpu_count()} CPUs, {s.repeat} repeat(s): median (min..max); all on "
        f"127.0.0.1, source `hikkoshi nbd serve`, proxy block size {s.proxy_block_size >> 10} KiB",
        "",
    ]
    if "read" in s.sections:
        lines += _report_read(b)
    if "relocate" in s.sections:
        lines += _report_relocate(b)
    if "wan" in s.sections:
        lines += _report_wan(b)
    if "fs" in s.sections and "fs" in b.images:
        lines += _report_fs(b)
    if "fswan" in s.sections:
        lines += _report_fswan(b)
    if b.checks:
        verdicts = "; ".join(f"{c['check']}: {'ok' if c.get('ok') else 'FAILED'}" for c in b.checks)
        lines += [f"Checks: {verdicts}.", ""]
    if b.errors:
        lines += ["Errors:", ""]
        lines += [f"- {e['section']} r{e['repeat'] + 1} {e['what']}: {e['error']}" for e in b.errors]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    settings.workdir.mkdir(parents=True, exist_ok=True)
    for tool in ("nbdcopy", "fio", "mkfs.ext4", "e2fsck", "debugfs", "dumpe2fs"):
        if shutil.which(tool) is None:
            log(f"{tool} is not on PATH")
            return 2
    bench = Bench(settings, stamp)
    results: dict[str, Any] = {
        "schema": 1,
        "kind": "proxy-relocation",
        "started_utc": now.isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.run_proxy", *(sys.argv[1:] if argv is None else argv)],
        "settings": settings.as_json(),
        "machine": machine_facts(settings.workdir),
        "tools": tool_versions(),
        "notes": {
            "source": "hikkoshi nbd serve IMAGE --export src --listen 127.0.0.1:0; image read once before "
            "(page cache), so 'cold' means not in the proxy's cache, not a cold disk",
            "relocation_time": "perf_counter from just before the proxy process is created to the first "
            "status poll (every 0.1 s, control socket 'status' request) that says upstream 'detached'",
            "wan": "relay `hikkoshi wan` between proxy and source only (through hikkoshi.cli.wan's parser "
            "when the CLI does not register the command)",
        },
        "interrupted": False,
    }
    interrupted = False
    started = time.perf_counter()
    try:
        for section in settings.sections:
            t0 = time.perf_counter()
            getattr(bench, f"section_{section}")()
            log(f"{section}: done in {time.perf_counter() - t0:.0f} s")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: processes stopped; writing partial results")
    report = markdown_report(bench, stamp)
    results.update(
        interrupted=interrupted,
        finished_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        wall_s=round(time.perf_counter() - started, 1),
        images=bench.images,
        commands={k: v for k, v in bench.commands.items()},
        runs=bench.runs,
        checks=bench.checks,
        errors=bench.errors,
        skipped=bench.skipped,
        section_settings=bench.section_settings,
        wan_cli_registered=bench.wan_cli,
        markdown=report,
    )
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path = write_results(results, settings.output_dir, stamp, "proxy")
    print(report)
    print(f"results: {path}")
    for name, cmd in bench.commands.items():
        print(f"command ({name}): {shlex.join(cmd)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
