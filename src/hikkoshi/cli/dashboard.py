"""`hikkoshi dashboard`: the web dashboard (hosts, VMs, migrations with live timelines, and the actions
a person takes), served on exactly ``--listen``, behind a login with the cluster's token.

With ``--agent URL`` (repeatable) it shows those agents' hosts; with ``--etcd URL`` the hosts the
cluster lists, through their agents. Every action goes through the agents' API, as the CLI's do.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from hikkoshi.daemons.process import run


def add_parser(top: Any) -> None:
    p = top.add_parser("dashboard", help="the web dashboard: hosts, VMs, live migrations")
    p.add_argument(
        "--listen", default="127.0.0.1:8720", metavar="HOST:PORT", help="where to serve it (port 0: pick one)"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--agent", dest="agents", action="append", metavar="URL", help="an agent to show (repeatable)"
    )
    where.add_argument("--etcd", metavar="URL[,URL...]", help="the cluster's etcd: show every host it lists")
    # SUPPRESS: given before the command word (``hikkoshi --token-file F dashboard``) it counts too.
    p.add_argument(
        "--token-file",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="F",
        help="the cluster's token, which the page asks for (default: $HIKKOSHI_TOKEN_FILE)",
    )
    p.add_argument(
        "--ca-file",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="F",
        help="CA of the agents' TLS certificates",
    )
    p.add_argument(
        "--link",
        default="1Gbit,0.5ms",
        metavar="RATE[,RTT]",
        help="the link predictions assume between hosts (default 1Gbit,0.5ms)",
    )
    p.set_defaults(func=dashboard_command)


def dashboard_command(args: argparse.Namespace) -> int:
    from hikkoshi.agent.client import AgentError, read_token
    from hikkoshi.cli.agent import parse_listen
    from hikkoshi.web.auth import Sessions
    from hikkoshi.web.context import Dashboard
    from hikkoshi.web.prediction import parse_link
    from hikkoshi.web.server import serve
    from hikkoshi.web.source import Source

    try:
        host, port = parse_listen(args.listen)
        token_file = args.token_file or os.environ.get("HIKKOSHI_TOKEN_FILE")
        if not token_file:
            raise ValueError("no token: give --token-file F or set HIKKOSHI_TOKEN_FILE")
        token = read_token(Path(token_file))
        link = parse_link(args.link)
        source: Source
        if args.etcd:
            from hikkoshi.web.etcd_source import EtcdSource

            source = EtcdSource(args.etcd, token, ca_file=args.ca_file)
        else:
            from hikkoshi.web.agent_source import AgentsSource

            source = AgentsSource(args.agents, token, ca_file=args.ca_file)
        return run(serve(Dashboard(source=source, sessions=Sessions(token), link=link), host, port))
    except (ValueError, AgentError, OSError) as exc:
        print(f"hikkoshi dashboard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
