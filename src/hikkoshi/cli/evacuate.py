"""``host maintenance HOST --enter``'s evacuation: every VM leaves the host (running ones live, then
powered-off ones offline), spread over the others by the planner's placement
(:func:`hikkoshi.drs.maintenance.evacuate`), each move a cluster migration job within the limits, shown
as it goes. A VM that cannot go anywhere stops it before anything moves, with the reason; the host stays
marked (nothing is placed on it) until ``--exit``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hikkoshi.cluster.store import Store

ROUNDS = 3
"""Plans made at most: a VM that arrived meanwhile (or a move that failed) gets another."""


async def evacuate(store: Store, args: argparse.Namespace) -> int:
    from hikkoshi.agent.drs_read import read_state
    from hikkoshi.cli.cluster_session import print_json
    from hikkoshi.cli.drs_carry import carry_out
    from hikkoshi.drs.maintenance import evacuate as plan_evacuation

    host = args.name
    done: list[dict[str, Any]] = []
    blocked: str | None = None
    failed = False
    for _ in range(ROUNDS):
        state = await read_state(store)
        ev = plan_evacuation(state.snapshot, [host], state.policy())
        if ev.blocked is not None:
            blocked = ev.blocked
            break
        if not ev.moves:
            break
        if not args.json:
            print(f"host {host!r} enters maintenance: {len(ev.moves)} VM(s) to move", flush=True)
        carried = await carry_out(state, ev.moves, args, quiet=args.json)
        done += [c.to_json() for c in carried]
        if any(not c.ok for c in carried):
            failed = True
            break
    after = (await read_state(store)).snapshot
    left = sorted(v.name for v in (*after.vms, *(x.vm for x in after.stopped)) if v.host == host)
    if args.json:
        print_json({"host": host, "moves": done, "complete": not left, "blocked": blocked, "left": left})
    elif blocked is not None:
        print(f"hikkoshi host maintenance: the evacuation stops: {blocked}", file=sys.stderr)
        print(
            f"host {host!r} is marked in maintenance (nothing is placed on it); VMs left: {', '.join(left)}"
        )
    elif left:
        print(f"host {host!r} is in maintenance but VMs are still on it: {', '.join(left)}")
    else:
        print(f"host {host!r} is in maintenance: no VM is on it")
    return 1 if blocked is not None or failed or left else 0
