"""`hikkoshi agent`: the daemon of one host (its VMs, datastores and migrations, behind an HTTPS API).

Each host has its own certificate of the cluster CA (``hikkoshi cluster issue``; ``--cert/--key/--ca``):
the API is served with it, agents talk to each other with it (mutual TLS; never with the token), and
QEMU's memory stream and every NBD connection between hosts are encrypted with it, unless
``--insecure-loopback`` (a lab on one machine). The token is for people and scripts. Sites: an agent is
in one (``--site``); migrations between sites joined by ``--wan-link`` go through the WAN emulator (lab
use: the relays live in the source's agent).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hikkoshi.cli.etcd_options import add_etcd_tls_arguments, etcd_config, etcd_urls
from hikkoshi.cli.migrate import parse_wan, wan_routes
from hikkoshi.daemons.process import run
from hikkoshi.vm.accel import DEFAULT_QEMU
from hikkoshi.vm.spec import parse_size

if TYPE_CHECKING:  # the agent's modules (FastAPI, uvicorn, httpx) load only when an agent runs
    from hikkoshi.agent.jobs import RouteFactory
    from hikkoshi.lab.link_model import WanParams
    from hikkoshi.migrate.storage import Route


def add_parser(top: Any) -> None:
    p = top.add_parser("agent", help="run the host agent (HTTP API for VMs and migrations)")
    p.add_argument("--name", help="this host's name (default: the one its certificate names; must match it)")
    p.add_argument(
        "--listen", default="127.0.0.1:8710", metavar="HOST:PORT", help="API address (port 0: pick one)"
    )
    p.add_argument("--cert", type=Path, required=True, metavar="F", help="this host's certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, metavar="F", help="its key (PEM, mode 0600)")
    p.add_argument("--ca", type=Path, required=True, metavar="F", help="the cluster CA's certificate (PEM)")
    p.add_argument(
        "--migration-address",
        metavar="IP",
        help="where this host's migration streams (memory, disks) listen (default: the API's address; "
        "never a wildcard)",
    )
    p.add_argument(
        "--insecure-loopback",
        action="store_true",
        help="migration streams in plain TCP (labs and tests on one machine; refused unless every address "
        "is a loopback one)",
    )
    p.add_argument(
        "--allow-dir",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="VM kernels, initrds and images may come from DIR too (besides the datastores; repeatable)",
    )
    p.add_argument(
        "--allow-wildcard-forwards",
        action="store_true",
        help="let VMs forward guest ports from every address of the host (0.0.0.0); default: loopback only",
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
    drs = p.add_argument_group("DRS", "what DRS counts of this host, and how often it samples its VMs")
    drs.add_argument("--vm-memory", metavar="SIZE", help="memory VMs may be given here (default: all)")
    drs.add_argument("--vm-cpus", type=int, default=0, metavar="N", help="cores VMs may use (default: all)")
    drs.add_argument(
        "--load-interval", type=float, default=10.0, metavar="S", help="seconds between load samples (10)"
    )
    drs.add_argument(
        "--datastore-capacity",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="the space DRS counts of a datastore (repeatable; default: its file system's)",
    )
    drs.add_argument("--load-window", type=int, default=30, metavar="N", help="samples DRS looks at (30)")
    drs.add_argument(
        "--drs-tick", type=float, default=1.0, metavar="S", help="seconds between looks at due schedules (1)"
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


def parse_capacities(items: list[str]) -> dict[str, int]:
    """``NAME=SIZE`` items."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, size = item.partition("=")
        if not sep or not name or not size:
            raise ValueError(f"--datastore-capacity {item!r}: expected NAME=SIZE")
        out[name] = parse_size(size)
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
    """The token in ``path``, made (random, mode 600) if the file does not exist; a file others may
    read is refused."""
    from hikkoshi.agent.client import read_token

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
    return read_token(path)


def check_addresses(listen: str, migration: str, insecure_loopback: bool) -> None:
    """Refuse addresses that expose more than asked: a wildcard migration address (peers are told where
    to connect), or plain streams on anything but loopback."""
    from hikkoshi.identity.names import is_loopback, is_wildcard

    if is_wildcard(migration):
        raise ValueError(
            f"the migration address {migration!r} is every address of the host: give --migration-address IP"
        )
    if insecure_loopback and not (is_loopback(listen) and is_loopback(migration)):
        raise ValueError(
            "--insecure-loopback sends VM memory and disks in plain TCP: refused unless the API and "
            f"migration addresses are loopback ones (they are {listen} and {migration})"
        )


def agent_command(args: argparse.Namespace) -> int:
    from hikkoshi.agent.client import AgentError
    from hikkoshi.agent.cluster_member import ClusterSettings
    from hikkoshi.agent.db import StateError
    from hikkoshi.agent.host import AgentConfig
    from hikkoshi.agent.malloc_arenas import limit_arenas
    from hikkoshi.agent.server import main_error, serve

    limit_arenas()  # before any thread allocates: see the module
    from hikkoshi.cluster.errors import ClusterError
    from hikkoshi.identity.credentials import HostCredentials

    try:
        host, port = parse_listen(args.listen)
        migration = args.migration_address.strip("[]") if args.migration_address else host
        check_addresses(host, migration, args.insecure_loopback)
        creds = HostCredentials.load(args.cert, args.key, args.ca)
        if args.name is not None and args.name != creds.name:
            raise ValueError(f"--name {args.name!r}, but {args.cert} is the certificate of {creds.name!r}")
        config = AgentConfig(
            name=creds.name,
            host=host,
            port=port,
            datastores=parse_datastores(args.datastore),
            state_dir=args.state_dir.absolute(),
            token=ensure_token(args.token_file),
            credentials=creds,
            site=args.site,
            qemu=args.qemu,
            migration_host=migration,
            insecure_loopback=args.insecure_loopback,
            allow_dirs=tuple(d.absolute() for d in args.allow_dir),
            allow_wildcard_forwards=args.allow_wildcard_forwards,
        )
        if etcd_urls(args):
            config.cluster = ClusterSettings(
                etcd_config(args),
                takeover_after=args.takeover_after,
                vm_memory=parse_size(args.vm_memory) if args.vm_memory else 0,
                vm_cpus=args.vm_cpus,
                load_interval=args.load_interval,
                load_window=args.load_window,
                datastore_capacity=parse_capacities(args.datastore_capacity),
                drs_tick=args.drs_tick,
            )
        routes = site_routes(parse_wan_links(args.wan_link), host)
        return run(serve(config, routes))
    except (ValueError, AgentError, StateError, OSError, ClusterError) as exc:
        return main_error(str(exc))
    except KeyboardInterrupt:
        return 130
