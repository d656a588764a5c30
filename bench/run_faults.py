"""The fault campaign: migrations hit at every phase, in every storage mode, by every fault, and what
they leave behind checked from QEMU processes and files, not from what the agents say.

    flock /tmp/hikkoshi-bench.lock .venv/bin/python -m bench.run_faults --seed N [--cases K] \
        [--only MODE/PHASE/FAULT,...]

Needs root (the hosts are network namespaces, so that a link can be cut). Two hosts, A and B, each a
namespace of the lab (:mod:`bench.netns_hosts`) with its own agent; for each case a fresh busy guest
boots on A and migrates to B, held at the case's phase while the fault strikes (:mod:`bench.fault_cases`
lists the cases and how they are chosen from the seed, :mod:`bench.fault_run` how one runs and what
counts as a miss). ``--cases`` (default 120) cases are chosen from ``--seed`` (default: random,
printed); ``--cases 0`` runs all of them.

A table is printed as the cases go (case, mode, phase, fault, where the VM ended, the record's outcome,
verified, seconds) and at the end, with the misses and a summary per fault, mode and phase. Results go to
bench/results/faults-<UTC timestamp>.json. Exit status 0 when no case missed, 1 otherwise (2: bad
arguments or not root, 130: interrupted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.agent_hosts import AgentHost, make_token
from bench.fault_cases import FAULTS, MODES, PHASES, Case, choose
from bench.fault_run import CaseResult, FaultRunner
from bench.host_census import kill_vm_processes
from bench.netns_hosts import NetnsLab, free_lab_number
from bench.run_nbd import DEFAULT_OUTPUT_DIR, DEFAULT_WORKDIR, log, machine_facts, write_results
from hikkoshi.guest.guest_image import build_guest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run_faults", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, help="chooses the cases (default: random, printed)")
    p.add_argument("--cases", type=int, default=120, help="how many (default 120; 0: every case)")
    p.add_argument("--only", help="these cases instead, MODE/PHASE/FAULT comma-separated")
    p.add_argument("--memory", type=int, default=160, help="guest memory, MiB (default 160)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--keep", action="store_true", help="keep the agents' logs and state")
    return p


def parse_only(text: str) -> list[Case]:
    """``MODE/PHASE/FAULT,...`` as cases."""
    cases = []
    for i, item in enumerate(t.strip() for t in text.split(",") if t.strip()):
        parts = item.split("/")
        if len(parts) != 3 or parts[0] not in MODES or parts[1] not in PHASES or parts[2] not in FAULTS:
            raise argparse.ArgumentTypeError(f"{item!r} is not MODE/PHASE/FAULT")
        cases.append(Case(i + 1, *parts))
    return cases


class Campaign:
    """Two hosts in a lab, their agents, and the cases run between them."""

    def __init__(self, workdir: Path, memory_mib: int) -> None:
        self.workdir = workdir
        self.lab = NetnsLab(["a", "b"], free_lab_number())
        self.pause_dir = workdir / "pause"
        self.hosts: list[AgentHost] = []
        self.memory_mib = memory_mib

    def __enter__(self) -> FaultRunner:
        self.pause_dir.mkdir(parents=True, exist_ok=True)
        token = self.workdir / "token"
        make_token(token)
        self.lab.up()
        for i in range(2):
            name = self.lab.plan.hosts[i].name
            state = Path(tempfile.mkdtemp(prefix=f"hkf-{name}-", dir="/tmp"))  # short: socket paths
            host = self.lab.agent(
                i,
                logs=self.workdir / "logs",
                state_dir=state,
                datastores={"main": self.workdir / name},
                token=token,
            )
            host.env["HIKKOSHI_PAUSE_DIR"] = str(self.pause_dir)
            self.hosts.append(host)
            host.start()
        return FaultRunner(self.hosts[0], self.hosts[1], self.pause_dir, self.lab, self.memory_mib)

    def __exit__(self, *_exc: object) -> None:
        for host in self.hosts:
            host.stop(signal.SIGTERM)
        kill_vm_processes([p for h in self.hosts for p in (h.state_dir, *h.datastores.values())])
        self.lab.down()
        for host in self.hosts:
            shutil.rmtree(host.state_dir, ignore_errors=True)


def table(results: list[CaseResult]) -> str:
    lines = [
        "| case | mode | phase | fault | ended on | outcome | verified | s | restarted by hand |",
        "|---:|---|---|---|---|---|---|---:|---|",
    ]
    for r in results:
        c = r.case
        where = r.where + (f" (cut: {r.during_cut})" if r.during_cut else "")
        verified = "yes" if r.verified and not r.misses else "NO"
        restarted = ", ".join(r.restarted) or "-"
        lines.append(
            f"| {c.number} | {c.mode} | {c.phase} | {c.fault} | {where} | {r.outcome} | {verified} "
            f"| {r.seconds:.0f} | {restarted} |"
        )
    return "\n".join(lines)


def summary(results: list[CaseResult]) -> dict[str, dict[str, dict[str, int]]]:
    """Cases and misses per fault, mode and phase."""
    out: dict[str, dict[str, dict[str, int]]] = {"fault": {}, "mode": {}, "phase": {}}
    for r in results:
        for key, value in (("fault", r.case.fault), ("mode", r.case.mode), ("phase", r.case.phase)):
            cell = out[key].setdefault(value, {"cases": 0, "misses": 0})
            cell["cases"] += 1
            cell["misses"] += 1 if r.misses else 0
    return out


def summary_table(s: dict[str, dict[str, dict[str, int]]]) -> str:
    lines = ["| fault | cases | misses |", "|---|---:|---:|"]
    for fault in FAULTS:
        cell = s["fault"].get(fault)
        if cell:
            lines.append(f"| {fault} | {cell['cases']} | {cell['misses']} |")
    return "\n".join(lines)


def _raise_interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("run_faults: needs root and iproute2 (the hosts are network namespaces)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1, 10**6)
    try:
        cases = parse_only(args.only) if args.only else choose(seed, args.cases)
    except argparse.ArgumentTypeError as exc:
        print(f"run_faults: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = args.workdir / f"faults-{stamp}"
    workdir.mkdir(parents=True)
    command = "python -m bench.run_faults " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    log(f"{command}: seed {seed}, {len(cases)} cases; work in {workdir}")
    build_guest()
    results: list[CaseResult] = []
    status = 1
    t0 = time.monotonic()
    try:
        with Campaign(workdir, args.memory) as runner:
            for case in cases:
                log(f"case {case.number}/{len(cases)}: {case.label}")
                result = runner.run(case)
                results.append(result)
                verdict = "ok" if not result.misses else "MISS: " + "; ".join(result.misses)[:600]
                where = f"ended on {result.where}, {result.outcome}"
                log(f"case {case.number}: {where}, {result.seconds:.0f} s: {verdict}")
                for note in result.cleanup:
                    log(f"case {case.number} cleanup: {note}")
        status = 0 if all(not r.misses for r in results) else 1
    except KeyboardInterrupt:
        status = 130
    finally:
        s = summary(results)
        missed = [r for r in results if r.misses]
        report = {
            "command": command,
            "seed": seed,
            "machine": machine_facts(workdir),
            "cases": len(results),
            "misses": len(missed),
            "seconds": round(time.monotonic() - t0, 1),
            "summary": s,
            "results": [r.row() for r in results],
        }
        path = write_results(report, args.output_dir, stamp, kind="faults")
        print(table(results))
        print()
        print(summary_table(s))
        print(f"\n{len(results)} cases, {len(missed)} missed (seed {seed}); results: {path}")
        for r in missed:
            print(f"- case {r.case.number} {r.case.label}: {'; '.join(r.misses)[:1000]}")
        if not args.keep and status == 0:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
