"""`hikkoshi agent`: the daemon of one host (its VMs, datastores and migrations, behind an HTTP API).

Agents of one cluster share a token: the CLI uses it to talk to an agent, and agents use it to talk to
each other when they migrate. Sites: an agent is in one (``--site``); migrations between sites joined
by ``--wan-link`` go through the WAN emulator (lab use: the relays live in the source's agent).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hikkoshi.cli.etcd_options import add_etcd_tls_arguments, etcd_config, etcd_urls
from hikkoshi.cli.migrate import parse_wan, wan_routes
from hikkoshi.daemons.process import run
from hikkoshi.vm.accel import DEFAULT_QEMU

if TYPE_CHECKING:  # the agent's modules (FastAPI, uvicorn, httpx) load only when an agent runs
    from hikkoshi.agent.jobs import RouteFactory
    from hikkoshi.lab.link_model import WanParams
    from hikkoshi.migrate.storage import Route


def add_parser(top: Any) -> None:
    p = top.add_parser("agent", help="run the host agent (HTTP API for VMs and migrations)")
    p.add_argument("--name", default=socket.gethostname(), help="this host's name (default: hostname)")
    p.add_argument(
        "--listen", default="127.0.0.1:8710", metavar="HOST:PORT", help="API address (port 0: pick one)"
    )
    p.add_argument(
        "--datastore",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a datastore (repeatable; the first is the default; made if PATH is empty)",
    )
    p.add_argument("--state-dir", type=Path, required=True, metavar="DIR", help="database, reports, sockets")
    p.add_argument(
        "--token-file", type=Path, required=True, metavar="F", help="the cluster's token (made if missing)"
    )
    p.add_argument("--site", default="default", help="the site this host is in (for --wan-link)")
    p.add_argument(
        "--wan-link",
        action="append",
        default=[],
        metavar="SITE:SITE=RTT,RATE",
        help="migrations between these sites cross an emulated WAN, e.g. a:b=150ms,100Mbit",
    )
    p.add_argument("--qemu", default=DEFAULT_QEMU, help="QEMU binary")
    p.add_argument("--tls-cert", type=Path, metavar="F", help="serve the API over TLS with this certificate")
    p.add_argument("--tls-key", type=Path, metavar="F")
    p.add_argument("--peer-ca", type=Path, metavar="F", help="CA of the other agents' TLS certificates")
    etcd = p.add_argument_group("cluster", "join an etcd cluster (see `hikkoshi cluster up` for a local one)")
    etcd.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        default=argparse.SUPPRESS,  # the global option's value (or $HIKKOSHI_ETCD) otherwise
        help="etcd client URLs (default: $HIKKOSHI_ETCD; none: the agent works alone)",
    )
    add_etcd_tls_arguments(etcd, defaults=False)
    etcd.add_argument(
        "--takeover-after",
        type=float,
        default=60.0,
        metavar="S",
        help="settle a migration into this host once its source host is down this long (default 60)",
    )
    p.set_defaults(func=agent_command)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def parse_datastores(items: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` items, in order."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--datastore {item!r}: expected NAME=PATH")
        if name in out:
            raise ValueError(f"datastore {name!r} is given twice")
        out[name] = Path(path).absolute()
    return out


def parse_wan_links(items: list[str]) -> dict[frozenset[str], WanParams]:
    """``SITE:SITE=RTT,RATE`` items."""
    out: dict[frozenset[str], WanParams] = {}
    for item in items:
        sites, sep, wan = item.partition("=")
        a, colon, b = sites.partition(":")
        if not sep or not colon or not a or not b or a == b:
            raise ValueError(f"--wan-link {item!r}: expected SITE:SITE=RTT,RATE")
        out[frozenset((a, b))] = parse_wan(wan)
    return out


def site_routes(links: dict[frozenset[str], WanParams], host: str) -> RouteFactory:
    """Routes through one emulated WAN path per migration between linked sites (relays on ``host``)."""

    @contextlib.asynccontextmanager
    async def routes(src: str, dst: str) -> AsyncIterator[Route | None]:
        async with wan_routes(links.get(frozenset((src, dst))), host) as route:
            yield route

    return routes


def ensure_token(path: Path) -> str:
    """The token in ``path``, made (random, mode 600) if the file does not exist."""
    from hikkoshi.agent.client import read_token

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError), path.open("x") as f:
            path.chmod(0o600)
            f.write(secrets.token_urlsafe(32) + "\n")
    return read_token(path)


def agent_command(args: argparse.Namespace) -> int:
    from hikkoshi.agent.client import AgentError
    from hikkoshi.agent.cluster_member import ClusterSettings
    from hikkoshi.agent.db import StateError
    from hikkoshi.agent.host import AgentConfig
    from hikkoshi.agent.server import main_error, serve
    from hikkoshi.cluster.errors import ClusterError

    try:
        host, port = parse_listen(args.listen)
        config = AgentConfig(
            name=args.name,
            host=host,
            port=port,
            datastores=parse_datastores(args.datastore),
            state_dir=args.state_dir.absolute(),
            token=ensure_token(args.token_file),
            site=args.site,
            qemu=args.qemu,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            peer_ca=args.peer_ca,
        )
        if etcd_urls(args):
            config.cluster = ClusterSettings(etcd_config(args), takeover_after=args.takeover_after)
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        routes = site_routes(parse_wan_links(args.wan_link), host)
        return run(serve(config, routes))
    except (ValueError, AgentError, StateError, OSError, ClusterError) as exc:
        return main_error(str(exc))
    except KeyboardInterrupt:
        return 130
