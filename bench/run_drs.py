"""DRS at scale, in one run: how long a plan takes, how many rounds balance a skewed cluster, and what
maintenance of a tenth of the hosts at once looks like.

    .venv/bin/python -m bench.run_drs [--quick] [--repeat 5] [--hosts 1000] [--vms 30000] [--seed 1]

Clusters come from :mod:`hikkoshi.drs.synthetic` (96-core, 1 TiB hosts; VMs of 1-8 vCPUs and 2-16 GiB,
steady loads with 5 % noise; shared datastores per site; deterministic for a seed). Three parts:

- plan: ``plan()`` on a skewed cluster (half the VMs on a quarter of the hosts) and on an even one,
  ``--repeat`` times each (wall clock, ``time.perf_counter``), with the default limits (32 optional moves
  per plan) and with 256; the snapshot's validation and the planner's state set-up timed alone too.
- converge: plan, apply (``simulator.apply``), plan again, at level 3, until a plan is empty: on a
  tenth of the scale with the default limits, and at full scale with a move limit of one per host.
  Rounds, moves, imbalance per round, predicted migration time per round (``simulator.timeline``).
- maintenance: ``evacuate()`` of every tenth host at once on an even cluster: moves, planning time,
  predicted time to carry them out (two migrations per host at once), bytes, the busiest host's load
  before and after, how many hosts take VMs.

Results go to bench/results/drs-<UTC timestamp>.json (machine facts, git revision, parameters, every
number) and a markdown summary is printed and stored under "markdown". Exit status 0 whatever the
numbers say (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bench.run_nbd import DEFAULT_OUTPUT_DIR, REPO_ROOT, log, machine_facts, write_results
from hikkoshi.drs.maintenance import evacuate
from hikkoshi.drs.model import Limits, Snapshot, problems
from hikkoshi.drs.plan import Plan
from hikkoshi.drs.planner import plan
from hikkoshi.drs.policy import LEVELS, Policy
from hikkoshi.drs.simulator import apply, timeline
from hikkoshi.drs.state import State
from hikkoshi.drs.synthetic import Shape, cluster

PLAN_FLOOR_S = 1.0
"""Issue 18: 1,000 hosts and 30,000 VMs plan in under a second."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run_drs", description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--vms", type=int, default=30000)
    p.add_argument("--repeat", type=int, default=5, help="plan() runs per case (default 5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--level", type=int, default=3, choices=sorted(LEVELS))
    p.add_argument("--max-rounds", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="a tenth of the scale, 2 repeats")
    p.add_argument("--output-dir", type=str, default=str(DEFAULT_OUTPUT_DIR))
    return p


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """Wall-clock seconds of ``repeat`` calls (a collection first, so none pays for another's garbage)."""
    seconds, result = [], None
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t)
    return seconds, result


def spread(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "min": round(min(seconds), 4),
        "median": round(statistics.median(seconds), 4),
        "max": round(max(seconds), 4),
    }


def bench_plan(shape: Shape, repeat: int, policy: Policy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, hot in (("skewed", 0.5), ("even", 0.0)):
        t = time.perf_counter()
        snap = cluster(replace(shape, hot=hot))
        made = time.perf_counter() - t
        for moves in (32, 256):
            s = replace(snap, limits=Limits(max_moves=moves))
            seconds, p = timed(partial(plan, s, policy), repeat)
            key = f"{name}, max_moves={moves}"
            out[key] = {
                "seconds": spread(seconds),
                "raw_seconds": [round(x, 4) for x in seconds],
                "moves": len(p.moves),
                "imbalance_before": round(p.imbalance_before, 4),
                "imbalance_after": round(p.imbalance_after, 4),
                "notes": list(p.notes),
                "snapshot_seconds": round(made, 2),
            }
            log(f"plan {key}: {spread(seconds)} s, {len(p.moves)} moves")
        out[f"{name}, parts"] = {
            "problems_seconds": spread(timed(partial(problems, snap), repeat)[0]),
            "state_seconds": spread(timed(partial(State, snap, policy), repeat)[0]),
        }
    return out


def converge(snap: Snapshot, policy: Policy, max_rounds: int) -> dict[str, Any]:
    """Plan and apply until a plan is empty; per round: moves, imbalance, plan time, migration time."""
    level = policy.balance
    rounds: list[dict[str, Any]] = []
    p: Plan | None = None
    for _ in range(max_rounds):
        gc.collect()
        t = time.perf_counter()
        p = plan(snap, policy)
        seconds = time.perf_counter() - t
        tl = timeline(p.moves, snap.limits)
        rounds.append(
            {
                "moves": len(p.moves),
                "imbalance_before": round(p.imbalance_before, 4),
                "imbalance_after": round(p.imbalance_after, 4),
                "plan_seconds": round(seconds, 3),
                "migration_seconds": round(tl.seconds, 1),
                "bytes": tl.bytes,
            }
        )
        if not p.moves:
            break
        snap = apply(snap, p)
    final = State(snap, policy).imbalance()
    under = level is not None and final <= level.tolerance
    return {
        "rounds_with_moves": sum(1 for r in rounds if r["moves"]),
        "tolerance": level.tolerance if level else None,
        "imbalance_start": rounds[0]["imbalance_before"],
        "imbalance_end": round(final, 4),
        "under_tolerance": under,
        "moves": sum(r["moves"] for r in rounds),
        "migration_seconds": round(sum(r["migration_seconds"] for r in rounds), 1),
        "last_notes": list(p.notes) if p is not None else [],
        "rounds": rounds,
    }


def bench_converge(shape: Shape, policy: Policy, max_rounds: int) -> dict[str, Any]:
    small = replace(shape, hosts=max(4, shape.hosts // 10), vms=max(40, shape.vms // 10), hot=0.5)
    full = replace(shape, hot=0.5, limits=Limits(max_moves=shape.hosts, max_moves_per_host=4))
    out = {}
    for name, s in (
        (f"{small.hosts} hosts, default limits", small),
        (f"{full.hosts} hosts, 1 move per host", full),
    ):
        result = converge(cluster(s), policy, max_rounds)
        log(
            f"converge {name}: {result['rounds_with_moves']} rounds, {result['moves']} moves, "
            f"imbalance {result['imbalance_start']} -> {result['imbalance_end']}"
        )
        out[name] = result
    return out


def bench_maintenance(shape: Shape, repeat: int, policy: Policy) -> dict[str, Any]:
    snap = cluster(replace(shape, hot=0.0))
    leaving = [h.name for h in snap.hosts[::10]]
    seconds, e = timed(lambda: evacuate(snap, leaving, policy), repeat)
    tl = timeline(e.moves, snap.limits)
    before = State(snap, policy)
    staying = [h.name for h in snap.hosts if h.name not in leaving]
    per_target: dict[str, int] = {}
    for m in e.moves:
        per_target[m.target] = per_target.get(m.target, 0) + 1
    result = {
        "hosts_leaving": len(leaving),
        "vms_on_them": sum(1 for v in snap.vms if v.host in set(leaving)),
        "complete": e.complete,
        "blocked": e.blocked,
        "moves": len(e.moves),
        "plan_seconds": spread(seconds),
        "migration_seconds": round(tl.seconds, 1),
        "concurrent_per_host": snap.limits.concurrent_per_host,
        "bytes": tl.bytes,
        "max_load_before_staying": round(max(before.load[h] for h in staying), 4),
        "max_load_after": round(e.max_load_after, 4),
        "mean_load_before": round(before.sum / before.n, 4),
        "hosts_taking_vms": len(per_target),
        "most_vms_to_one_host": max(per_target.values(), default=0),
    }
    log(f"maintenance: {result['moves']} moves in {spread(seconds)} s, max load {result['max_load_after']}")
    return result


def markdown(results: dict[str, Any]) -> str:
    pr = results["parameters"]
    lines = [
        f"Clusters of {pr['hosts']} hosts and {pr['vms']} VMs (seed {pr['seed']}), level {pr['level']}.",
        "",
        "| plan() | min (s) | median (s) | max (s) | moves | imbalance before -> after |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for key, r in results["plan"].items():
        if "seconds" in r:
            s = r["seconds"]
            lines.append(
                f"| {key} | {s['min']} | {s['median']} | {s['max']} | {r['moves']} | "
                f"{r['imbalance_before']} -> {r['imbalance_after']} |"
            )
    for key, r in results["plan"].items():
        if "state_seconds" in r:
            check, setup = r["problems_seconds"], r["state_seconds"]
            lines.append(
                f"| {key}: validation / state set-up | {check['min']} / {setup['min']} "
                f"| {check['median']} / {setup['median']} | | | |"
            )
    main = results["plan"]["skewed, max_moves=32"]["seconds"]["median"]
    verdict = "PASS" if main < PLAN_FLOOR_S else "FAIL"
    lines += ["", f"Floor: skewed plan median {main} s < {PLAN_FLOOR_S} s: **{verdict}**", ""]
    lines += [
        f"| converge (level {pr['level']}) | rounds | moves | imbalance start -> end | tolerance "
        "| predicted migration time (s) |",
        "|---|--:|--:|---|--:|--:|",
    ]
    for key, r in results["converge"].items():
        lines.append(
            f"| {key} | {r['rounds_with_moves']} | {r['moves']} | "
            f"{r['imbalance_start']} -> {r['imbalance_end']} | {r['tolerance']} | {r['migration_seconds']} |"
        )
    m = results["maintenance"]
    lines += [
        "",
        "| maintenance | hosts | VMs moved | plan (s, median) | predicted migrations (s) | TB moved | "
        "max load before -> after | hosts taking VMs | most VMs to one host |",
        "|---|--:|--:|--:|--:|--:|---|--:|--:|",
        f"| every 10th host | {m['hosts_leaving']} | {m['moves']} | {m['plan_seconds']['median']} | "
        f"{m['migration_seconds']} | {m['bytes'] / 1e12:.1f} | {m['max_load_before_staying']} -> "
        f"{m['max_load_after']} | {m['hosts_taking_vms']} | {m['most_vms_to_one_host']} |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.hosts, args.vms, args.repeat = args.hosts // 10, args.vms // 10, 2
    shape = Shape(hosts=args.hosts, vms=args.vms, seed=args.seed)
    policy = Policy(level=args.level)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    results: dict[str, Any] = {
        "kind": "drs",
        "machine": machine_facts(REPO_ROOT),
        "git_rev": rev.stdout.strip(),
        "command": "python -m bench.run_drs " + " ".join(sys.argv[1:] if argv is None else argv),
        "parameters": {
            "hosts": args.hosts,
            "vms": args.vms,
            "repeat": args.repeat,
            "seed": args.seed,
            "level": args.level,
        },
    }
    results["plan"] = bench_plan(shape, args.repeat, policy)
    results["converge"] = bench_converge(shape, policy, args.max_rounds)
    results["maintenance"] = bench_maintenance(shape, args.repeat, policy)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["markdown"] = markdown(results)
    path = write_results(results, Path(args.output_dir), stamp, "drs")
    print(results["markdown"])
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
