"""`hikkoshi cluster init DIR` and `hikkoshi cluster issue HOST`: the cluster's certificate authority,
kept by the user, and one certificate per host for its agent (``--cert/--key/--ca``).

The CA's key signs every host's identity: keep ``DIR`` (mode 0700) off the hosts, or at least away from
the agents' state. A host's files are written to ``--out`` (``host-cert.pem``, ``host-key.pem`` mode
0600, ``ca-cert.pem``); copy that directory to the host.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_subcommands(cluster: Any) -> None:
    """``init`` and ``issue`` in the ``cluster`` command group."""
    init = cluster.add_parser("init", help="make the cluster's certificate authority (kept by you)")
    init.add_argument("dir", type=Path, metavar="DIR", help="where the CA goes (made, mode 0700)")
    init.add_argument("--name", default="hikkoshi cluster CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650, help="how long the CA is valid (default 3650)")
    init.set_defaults(func=init_command)

    issue = cluster.add_parser("issue", help="make one host's certificate, signed by the cluster CA")
    issue.add_argument("host", metavar="HOST", help="the host's name (lower-case DNS name; its agent's name)")
    issue.add_argument(
        "--ca", type=Path, required=True, metavar="DIR", help="the CA's directory (cluster init)"
    )
    issue.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the host's files go")
    issue.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="IP",
        help="an address of the host (its API and migration addresses; repeatable)",
    )
    issue.add_argument("--days", type=int, default=825, help="how long it is valid (default 825)")
    issue.set_defaults(func=issue_command)


def init_command(args: argparse.Namespace) -> int:
    from hikkoshi.identity.authority import AuthorityError, make_ca

    try:
        cert = make_ca(args.dir.absolute(), args.name, args.days)
    except (AuthorityError, OSError) as exc:
        print(f"hikkoshi cluster init: {exc}", file=sys.stderr)
        return 2
    print(f"cluster CA made in {args.dir} (its key: {args.dir / 'ca-key.pem'}, keep it safe)")
    print(
        f"issue each host's certificate: hikkoshi cluster issue HOST --ca {args.dir} --out DIR --address IP"
    )
    print(f"the CA's certificate for people's CLI (--ca-file / HIKKOSHI_CA_FILE): {cert}")
    return 0


def issue_command(args: argparse.Namespace) -> int:
    from hikkoshi.identity.authority import AuthorityError, issue_host

    try:
        issued = issue_host(args.ca.absolute(), args.host, args.out.absolute(), args.address, args.days)
    except (AuthorityError, ValueError, OSError) as exc:
        print(f"hikkoshi cluster issue: {exc}", file=sys.stderr)
        return 2
    addresses = ", ".join(args.address) or "none"
    print(f"certificate of host {args.host} (addresses: {addresses}) in {args.out}")
    print(f"its agent: hikkoshi agent --cert {issued.cert} --key {issued.key} --ca {issued.ca} ...")
    return 0
