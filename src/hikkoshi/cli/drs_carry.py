"""Carrying a plan's moves out from the command line: started at the source hosts' agents (cluster
migration jobs, within the limits), followed to the end with a line per change of phase."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hikkoshi.agent.drs_moves import Carried, Connect
    from hikkoshi.agent.drs_read import ClusterState
    from hikkoshi.drs.plan import Move


def connector(args: argparse.Namespace) -> Connect:
    """Clients of the cluster's agents, with this command's token and CA."""
    from hikkoshi.agent.client import AgentClient

    return lambda url: AgentClient.from_env(url, args.token_file, args.ca_file)


async def carry_out(
    state: ClusterState, moves: Sequence[Move], args: argparse.Namespace, *, quiet: bool = False
) -> list[Carried]:
    """Start the moves at their source agents and follow them to the end, a line per change."""
    from hikkoshi.agent.drs_moves import follow, start
    from hikkoshi.cli.drs_tables import move_line

    connect = connector(args)
    carried = await start(state, moves, connect)
    index = {id(c): i + 1 for i, c in enumerate(carried)}

    def show(c: Carried) -> None:
        if not quiet:
            m = c.move
            print(
                move_line(index[id(c)], len(carried), m.vm, m.source, m.target, c.phase, c.error), flush=True
            )

    for c in carried:
        show(c)
    await follow(carried, connect, show)
    return carried
