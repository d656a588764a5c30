"""Endurance: one busy guest migrated again and again between real agents, every storage mode in turn,
both agents restarted in the middle, and afterwards nothing left anywhere but the VM where it runs.

    flock /tmp/hikkoshi-bench.lock .venv/bin/python -m bench.run_endurance [--moves 40] [--after 10] \
        [--agents 3]

Agents are real processes on loopback, each with two datastores (``main`` and ``fast``, for storage
migrations). The guest runs the ``busy`` workload (the disk writer, which reads back every record and
compares its whole ring with its memory copy after every progress line, and the memory dirtier). The
moves follow :mod:`bench.endurance_plan`: postcopy, hybrid, precopy, shared, quick, storage-migrate,
round the ring of agents. After every move the guest must check its ring twice on its new host (the
disk and its memory agree), and exactly one QEMU of the VM must exist, on that host.

After ``--moves`` moves: the agent where the VM runs is stopped with SIGTERM while idle and started
again on the same state directory; then a migration is interrupted by a SIGKILL of its destination's
agent in the memory pre-copy (held there by the jobs' pause hook), the agent is started again, and the
migration must end by itself (rolled back, or done) with the guest verified. Then ``--after`` more
moves. At the end, on every host: no process, Unix socket, listening port, file, bitmap, disk plan,
move journal or home beyond the one VM where it runs; the agents know of nothing else and have no
migration in flight; each agent's RSS and open files within 10 % of what they were after the first 5
moves (for an agent restarted in the middle, a new process: of what they were 5 moves after the
restarts; with ``--after`` 5 or fewer it is not compared). Finally the guest is powered off (its own
full check) and its disk image is verified.

Results (every move with its time and downtime, figures per mode, RSS and open files, leftovers) go to
bench/results/endurance-<UTC timestamp>.json and a markdown summary is printed. Exit status 0 when every
check passed, 1 otherwise (2: bad arguments, 130: interrupted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.agent_hosts import AgentHost, make_token
from bench.busy_guest import BusyGuest, GuestFailed
from bench.endurance_plan import MODES, Move, plan
from bench.host_census import kill_vm_processes, processes, qemus
from bench.leftovers import home_of, host_leftovers, scratch_dirs
from bench.run_nbd import DEFAULT_OUTPUT_DIR, DEFAULT_WORKDIR, log, machine_facts, write_results
from hikkoshi.guest.guest_image import build_guest

VM = "endure"
#: Allowed drift of an agent's RSS and open files between the fifth move and the end.
USAGE_TOLERANCE = 0.10
PAUSE_DIR = "pause"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run_endurance", description=__doc__.split("\n")[0])
    p.add_argument("--moves", type=int, default=40, help="moves before the restarts (default 40)")
    p.add_argument("--after", type=int, default=10, help="moves after the restarts (default 10)")
    p.add_argument("--agents", type=int, default=3, choices=(2, 3), help="agents (default 3)")
    p.add_argument("--memory", type=int, default=192, help="guest memory, MiB (default 192)")
    p.add_argument("--move-timeout", type=float, default=600.0, help="seconds a move may take")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--keep", action="store_true", help="keep the agents' logs and datastores")
    return p


@dataclass
class MoveResult:
    """One move as it went."""

    number: int
    mode: str
    source: str
    target: str
    phase: str
    seconds: float
    """From the request to the migration's end."""
    verify_seconds: float
    """Until the guest checked its ring twice on its new host."""
    downtime_ms: float | None
    migration: str
    durable: int


class Endurance:
    """One run (see the module's docstring)."""

    def __init__(self, hosts: list[AgentHost], guest: BusyGuest, move_timeout: float) -> None:
        self.hosts = hosts
        self.guest = guest
        self.move_timeout = move_timeout
        self.where = 0
        self.holder: int | None = None
        """The host holding the disks of a VM that left it with shared storage."""
        self.uuid = ""
        self.moves: list[MoveResult] = []
        self.events: list[dict[str, Any]] = []
        self.usage_after_5: dict[str, dict[str, int]] = {}
        self.usage_end: dict[str, dict[str, int]] = {}
        self.restarted: set[str] = set()
        """Agents restarted in the middle: a new process, whose baseline is taken again after 5 moves
        (the first moves import and warm what a migration uses; a fresh process is no baseline)."""
        self.not_compared: list[str] = []
        self.open_files: dict[int, dict[str, list[str]]] = {}
        """After that many moves: what each agent's file descriptors were."""
        self.trace: list[dict[str, Any]] = []
        """Each agent's RSS and open files after every move (not idle: for the trend)."""
        self.failures: list[str] = []

    @property
    def here(self) -> AgentHost:
        return self.hosts[self.where]

    # --- moves ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.guest.create(self.here.api)
        self.uuid = str(self.here.api.vms()[VM]["uuid"])
        self.check_hosts("after the start")

    def datastore_of(self, host: AgentHost) -> str:
        home = home_of(host, VM)
        assert home is not None, f"no home of {VM} on {host.name}"
        return next(ds for ds, path in host.datastores.items() if path == home.parent)

    def move(self, m: Move) -> MoveResult:
        src, dst = self.hosts[m.source], self.hosts[m.target]
        t0 = time.monotonic()
        if m.mode == "storage":
            other = next(ds for ds in src.datastores if ds != self.datastore_of(src))
            migration = src.api.storage_migrate(VM, other)
        else:
            mode = "quick" if m.mode == "quick" else "live"
            storage = "hybrid" if m.mode == "quick" else m.mode
            migration = src.api.migrate(VM, dst.url, storage=storage, mode=mode)
        info = src.api.wait_final(migration, self.move_timeout)
        seconds = time.monotonic() - t0
        if info["phase"] != "done":
            raise RuntimeError(f"move {m.number} ({m.mode}) ended {info['phase']}: {info['error']}")
        self.moved(m)
        durable, verify_s = self.verify()
        self.check_hosts(f"after move {m.number} ({m.mode})")
        self.trace.append({"move": m.number, **{h.name: h.usage() for h in self.hosts}})
        result = MoveResult(
            m.number,
            m.mode,
            src.name,
            dst.name,
            info["phase"],
            round(seconds, 2),
            round(verify_s, 2),
            info["report"].get("downtime_ms"),
            migration,
            durable,
        )
        self.moves.append(result)
        log(
            f"move {m.number:3} {m.mode:8} {src.name}->{dst.name} {seconds:6.1f} s"
            f" (downtime {result.downtime_ms} ms, verified in {verify_s:.1f} s)"
        )
        return result

    def moved(self, m: Move) -> None:
        """Where the VM and its disks are after ``m``."""
        if m.mode == "shared" and m.target != self.holder:
            self.holder = m.source if self.holder is None else self.holder
        else:
            self.holder = None  # moved, pulled in, or home to its holder
        self.where = m.target

    def check_hosts(self, when: str) -> None:
        """Each host holds what it should of the VM and nothing else."""
        procs = processes()
        for i, host in enumerate(self.hosts):
            role = "runs" if i == self.where else "holds" if i == self.holder else None
            remote = role == "runs" and self.holder is not None
            left = host_leftovers(host, vm=VM, uuid=self.uuid, role=role, remote=remote, procs=procs)
            if left:
                raise RuntimeError(f"{when}, on {host.name}: {left}")

    def verify(self) -> tuple[int, float]:
        """The guest checks its ring twice where it runs now; exactly one QEMU of it exists, there."""
        t0 = time.monotonic()
        api = self.here.api
        mark = self.guest.console_size(api)
        durable = self.guest.wait_checked(api, mark)
        found = qemus(self.uuid)
        roots = [str(p) + "/" for p in self.here.datastores.values()]
        if len(found) != 1 or not any(r in a for a in found[0].argv for r in roots):
            raise RuntimeError(
                f"{len(found)} QEMU processes of {VM}, expected one on {self.here.name}: {found}"
            )
        return durable, time.monotonic() - t0

    def usage(self) -> dict[str, dict[str, int]]:
        time.sleep(2.0)  # idle: connections of the last move closed
        self.open_files[len(self.moves)] = {h.name: h.open_files() for h in self.hosts}
        return {h.name: h.usage() for h in self.hosts}

    # --- restarts ------------------------------------------------------------------------------------------

    def restart_idle(self) -> None:
        """SIGTERM the agent where the VM runs, while idle; start it again; the guest goes on."""
        host = self.here
        t0 = time.monotonic()
        code = host.restart(signal.SIGTERM)
        self.restarted.add(host.name)
        state = host.api.vms()[VM]["state"]
        if state != "running":
            raise RuntimeError(f"after its agent's restart {VM} is {state}")
        self.verify()
        self.check_hosts("after the agent's restart")
        self.events.append(
            {
                "event": "SIGTERM, idle",
                "agent": host.name,
                "exit": code,
                "seconds": round(time.monotonic() - t0, 2),
            }
        )
        log(f"agent {host.name}: SIGTERM while idle (exit {code}), started again; the guest runs on")

    def interrupted_move(self, pause_dir: Path, phase: str = "memory-precopy") -> None:
        """A migration whose destination agent is SIGKILLed at ``phase``; the agent starts again and the
        migration ends by itself."""
        src = self.here
        target = (self.where + 1) % len(self.hosts)
        dst = self.hosts[target]
        t0 = time.monotonic()
        (pause_dir / "pause-at").write_text(phase)
        migration = src.api.migrate(VM, dst.url, storage="hybrid")
        marker = pause_dir / f"{migration}.paused"
        deadline = time.monotonic() + 120
        while not marker.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"migration {migration} never reached {phase}")
            time.sleep(0.02)
        (pause_dir / "pause-at").unlink()
        code = dst.stop(signal.SIGKILL)
        self.restarted.add(dst.name)
        marker.unlink()
        time.sleep(3.0)  # the job meets the dead agent
        dst.start()
        info = src.api.wait_final(migration, self.move_timeout)
        if info["phase"] not in ("done", "rolled-back"):
            raise RuntimeError(f"interrupted migration ended {info['phase']}: {info['error']}")
        if info["phase"] == "done":
            self.moved(Move(0, "hybrid", self.where, target))
        self.verify()
        self.check_hosts("after the interrupted migration")
        self.events.append(
            {
                "event": f"SIGKILL of the destination agent in {phase}",
                "agent": dst.name,
                "exit": code,
                "migration": migration,
                "phase": info["phase"],
                "error": info["error"],
                "seconds": round(time.monotonic() - t0, 2),
            }
        )
        log(f"agent {dst.name}: SIGKILL in {phase} of migration {migration}; it ended {info['phase']}")

    # --- the end -------------------------------------------------------------------------------------------

    def final_checks(self, scratch_before: set[str]) -> dict[str, Any]:
        procs = processes()
        leftovers = {
            h.name: host_leftovers(
                h, vm=VM, uuid=self.uuid, role="runs" if h is self.here else None, procs=procs
            )
            for h in self.hosts
        }
        scratch = sorted(scratch_dirs() - scratch_before)
        for name, problems in leftovers.items():
            self.failures += [f"{name}: {p}" for p in problems]
        self.failures += [f"scratch directory {s} is left over" for s in scratch]
        drift = {}
        for name, before in self.usage_after_5.items():
            if name in self.restarted:
                self.not_compared.append(name)
                continue
            after = self.usage_end[name]
            drift[name] = {k: round(after[k] / before[k] - 1, 4) for k in before}
            for k, v in drift[name].items():
                if abs(v) > USAGE_TOLERANCE:
                    self.failures.append(
                        f"agent {name}: {k} {before[k]} after 5 moves, {after[k]} at the end"
                    )
        return {
            "leftovers": leftovers,
            "scratch": scratch,
            "usage_drift": drift,
            "usage_not_compared": self.not_compared,
        }

    def rebaseline(self) -> None:
        """The restarted agents' baseline, now (5 moves after the restarts)."""
        now = self.usage()
        for name in self.restarted:
            self.usage_after_5[name] = now[name]
        self.restarted.clear()


def summarize(moves: list[MoveResult]) -> dict[str, Any]:
    """Per mode: moves, median and max seconds, median and max downtime."""
    out: dict[str, Any] = {}
    for mode in MODES:
        mine = [m for m in moves if m.mode == mode]
        if not mine:
            continue
        secs = [m.seconds for m in mine]
        downs = [m.downtime_ms for m in mine if m.downtime_ms is not None]
        out[mode] = {
            "moves": len(mine),
            "median_s": round(statistics.median(secs), 2),
            "max_s": max(secs),
            "median_downtime_ms": round(statistics.median(downs), 1) if downs else None,
            "max_downtime_ms": max(downs) if downs else None,
            "median_verify_s": round(statistics.median(m.verify_seconds for m in mine), 2),
        }
    return out


def markdown(results: dict[str, Any]) -> str:
    failures = results["failures"]
    verdict = "all checks passed" if not failures else "FAILED: " + "; ".join(failures[:5])
    lines = [
        f"Endurance ({results['command']}): {results['moves_done']} moves of one busy guest across "
        f"{len(results['agents'])} agents, {len(results['events'])} agent restarts; {verdict}",
        "",
        "| mode | moves | median s | max s | median downtime ms | max downtime ms | verified in (median s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, s in results["per_mode"].items():
        lines.append(
            f"| {mode} | {s['moves']} | {s['median_s']} | {s['max_s']} | {s['median_downtime_ms'] or '-'} "
            f"| {s['max_downtime_ms'] or '-'} | {s['median_verify_s']} |"
        )
    lines += [
        "",
        "| agent | RSS after 5 moves (KiB) | RSS at the end | fds after 5 | fds at the end |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, before in results["usage_after_5"].items():
        after = results["usage_end"].get(name, {})
        rss, fds = after.get("rss_kib"), after.get("fds")
        lines.append(f"| {name} | {before['rss_kib']} | {rss} | {before['fds']} | {fds} |")
    for event in results["events"]:
        lines.append(f"\n- {event['event']}: agent {event['agent']} ({event['seconds']} s)")
    return "\n".join(lines)


def make_hosts(workdir: Path, count: int) -> list[AgentHost]:
    token = workdir / "token"
    make_token(token)
    (workdir / PAUSE_DIR).mkdir(exist_ok=True)
    hosts = []
    for name in "abc"[:count]:
        state = Path(tempfile.mkdtemp(prefix=f"hke-{name}-", dir="/tmp"))  # short: socket paths
        datastores = {ds: workdir / name / ds for ds in ("main", "fast")}
        env = {"HIKKOSHI_PAUSE_DIR": str(workdir / PAUSE_DIR)}
        hosts.append(AgentHost(name, workdir / "logs", state, datastores, token, env=env))
    return hosts


def teardown(hosts: list[AgentHost], keep: bool, workdir: Path) -> None:
    """Stop the agents, kill what is left of the VM by pid, remove what the run made."""
    for host in hosts:
        host.stop(signal.SIGTERM)
    kill_vm_processes([p for h in hosts for p in (h.state_dir, *h.datastores.values())])
    if not keep:
        for host in hosts:
            shutil.rmtree(host.state_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _raise_interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.moves < 6 or args.after < 1:
        print("run_endurance: at least 6 moves before the restarts and 1 after", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = args.workdir / f"endurance-{stamp}"
    workdir.mkdir(parents=True)
    command = "python -m bench.run_endurance " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    results: dict[str, Any] = {"command": command.strip(), "machine": machine_facts(workdir), "failures": []}
    build_guest()
    hosts = make_hosts(workdir, args.agents)
    guest = BusyGuest(VM, random.randrange(1, 2**31), memory_mib=args.memory)
    run = Endurance(hosts, guest, args.move_timeout)
    scratch_before = scratch_dirs()
    t0 = time.monotonic()
    status = 1
    try:
        for host in hosts:
            host.start()
        run.start()
        log(f"{VM} runs on {run.here.name} (run {guest.run})")
        first = plan(args.moves, len(hosts))
        for m in first:
            run.move(m)
            if m.number == 5:
                run.usage_after_5 = run.usage()
        run.restart_idle()
        run.interrupted_move(workdir / PAUSE_DIR)
        for m in plan(args.after, len(hosts), first=args.moves + 1, start_host=run.where, offset=args.moves):
            run.move(m)
            if m.number == args.moves + 5 and args.after > 5:
                run.rebaseline()
        run.usage_end = run.usage()
        results.update(run.final_checks(scratch_before))
        last = guest.stop_and_verify(run.here.api, run.here.datastores[run.datastore_of(run.here)])
        results["guest"] = {"run": guest.run, "last_record": last, "verified": True}
        status = 0 if not run.failures else 1
    except KeyboardInterrupt:
        run.failures.append("interrupted")
        status = 130
    except (RuntimeError, GuestFailed, TimeoutError) as exc:
        run.failures.append(f"{type(exc).__name__}: {exc}")
        log(f"endurance: {exc}")
    finally:
        results.update(
            {
                "agents": [h.name for h in hosts],
                "moves_done": len(run.moves),
                "moves": [asdict(m) for m in run.moves],
                "per_mode": summarize(run.moves),
                "events": run.events,
                "usage_after_5": run.usage_after_5,
                "usage_end": run.usage_end,
                "usage_not_compared": run.not_compared,
                "open_files": run.open_files,
                "usage_trace": run.trace,
                "failures": run.failures,
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
        teardown(hosts, args.keep or status != 0, workdir)
        path = write_results(results, args.output_dir, stamp, kind="endurance")
        print(markdown(results))
        log(f"results: {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
