"""Entry point of the `hikkoshi` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hikkoshi import __version__
from hikkoshi.cli import nbd_move, nbd_proxy, nbd_serve, nbd_stats, nbd_status
from hikkoshi.cli.etcd_options import add_etcd_arguments, cluster_wanted
from hikkoshi.daemons.process import setup_logging


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line parser; for ``nbd ...`` (given ``argv``) only the data plane's commands.

    Those run as services a VM start or a migration waits for (the NBD service, relocation proxies):
    importing the VM and migration commands too would add ~0.2 s to each start."""
    parser = argparse.ArgumentParser(
        prog="hikkoshi", description="Move running VMs, their disks and identity."
    )
    parser.add_argument("--version", action="version", version=f"hikkoshi {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument(
        "--agent", metavar="URL", help="work through this host agent (default: $HIKKOSHI_AGENT; else locally)"
    )
    parser.add_argument(
        "--token-file", type=Path, metavar="F", help="the agent's token (default: $HIKKOSHI_TOKEN_FILE)"
    )
    parser.add_argument("--ca-file", type=Path, metavar="F", help="CA of the agent's TLS certificate")
    add_etcd_arguments(parser)
    top = parser.add_subparsers(dest="command", required=True)
    nbd = top.add_parser("nbd", help="the NBD data plane").add_subparsers(dest="nbd_command", required=True)
    nbd_serve.add_parser(nbd)
    nbd_proxy.add_parser(nbd)
    nbd_status.add_parser(nbd)
    nbd_stats.add_parser(nbd)
    nbd_move.add_parser(nbd)
    if argv is not None and _data_plane_only(argv):
        return parser
    from hikkoshi.cli import cluster, datastore, guest, hosts, limits, vm

    guest.add_parser(top)
    hosts.add_subcommands(datastore.add_parser(top))
    vm.add_parser(top)
    limits.add_parser(top)
    cluster.add_parser(top)
    from hikkoshi.cli import demo

    demo.add_parser(top)
    from hikkoshi.cli import wan

    wan.add_parser(top)
    from hikkoshi.cli import migrate

    migrate.add_parser(top)
    from hikkoshi.cli import agent, lab

    agent.add_parser(top)
    lab.add_parser(top)
    from hikkoshi.cli import dashboard

    dashboard.add_parser(top)
    return parser


def _data_plane_only(argv: list[str]) -> bool:
    """Whether the command is ``nbd ...``: the word ``nbd`` with only -v flags before it (the other
    options take values, which could read ``nbd``)."""
    for arg in argv:
        if arg == "nbd":
            return True
        if arg != "--verbose" and not (arg.startswith("-v") and set(arg[1:]) == {"v"}):
            return False
    return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    via_cluster = getattr(args, "via_cluster", None)
    if via_cluster is not None:
        try:
            in_cluster = cluster_wanted(args)
        except ValueError as exc:
            parser.error(str(exc))
        if in_cluster:
            code: int = via_cluster(args)
            return code
    remote = getattr(args, "remote", None)
    if remote is not None:
        from hikkoshi.cli import remote as remote_cli

        if remote_cli.wanted(args):
            code = remote(args)
            return code
    for option in getattr(args, "local_requires", ()):
        if getattr(args, option) is None:
            parser.error(f"--{option.replace('_', '-')} is required (or work through an agent: --agent URL)")
    code = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
