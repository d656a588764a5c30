"""`hikkoshi cluster up|down|status`: the cluster's etcd.

``cluster up --state-dir DIR`` runs the embedded single-member etcd (data in ``DIR/etcd``, on loopback
only) under a supervisor that restarts it if it dies and stops it cleanly on SIGTERM or SIGINT; in
the foreground, or with ``--detach`` in the background (its pid in ``DIR/cluster.pid``, its log in
``DIR/cluster.log``). ``cluster down --state-dir DIR`` stops it. ``cluster status`` says how an etcd
cluster is doing: the local one (``--state-dir``) or any (``--etcd``). For real hosts, run an etcd
cluster of 3 or 5 members and give every agent ``--etcd`` (with ``--etcd-ca/-cert/-key`` for TLS).

Subcommands are added by :func:`add_subcommands`, so that other modules can add theirs to the group.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hikkoshi.cluster.etcd_health import ClusterHealth
    from hikkoshi.cluster.etcd_supervisor import SupervisorInfo
    from hikkoshi.cluster.store import Store

DEFAULT_LISTEN = "127.0.0.1:2379"
DETACH_TIMEOUT = 60.0


def add_parser(top: Any) -> Any:
    """The ``cluster`` group; its subparsers (for :func:`add_subcommands` and others)."""
    group = top.add_parser("cluster", help="the cluster's etcd: a local one (up, down), its status")
    sub = group.add_subparsers(dest="cluster_command", required=True)
    add_subcommands(sub)
    return sub


def add_subcommands(sub: Any) -> None:
    """``up``, ``down`` and ``status`` in the ``cluster`` group."""
    p = sub.add_parser("up", help="run a local single-member etcd (loopback only), supervised")
    p.add_argument(
        "--state-dir", type=Path, required=True, metavar="DIR", help="etcd's data goes in DIR/etcd"
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="127.0.0.1:PORT",
        help=f"client address (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--peer-port", type=int, metavar="PORT", help="etcd's peer port (default: the client port + 1)"
    )
    p.add_argument("--detach", action="store_true", help="run in the background; return once etcd is healthy")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        metavar="N",
        help="restarts of etcd within 10 minutes before giving up",
    )
    p.set_defaults(func=up_command)
    p = sub.add_parser("down", help="stop the local etcd of `cluster up` (SIGTERM, a wait, SIGKILL)")
    p.add_argument("--state-dir", type=Path, required=True, metavar="DIR")
    p.add_argument("--timeout", type=float, default=20.0, metavar="S", help="how long to wait before SIGKILL")
    p.set_defaults(func=down_command)
    p = sub.add_parser("status", help="members, leader, health, database size, hosts, VMs, migrations")
    p.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="the local etcd of `cluster up` (else --etcd)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status_command)


def _fail(args: argparse.Namespace, message: str, code: int = 2) -> int:
    print(f"hikkoshi cluster {args.cluster_command}: {message}", file=sys.stderr)
    return code


def parse_loopback(text: str) -> tuple[str, int]:
    """``127.0.0.1:PORT`` (``localhost`` is the same); ValueError for any other address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {text!r}: expected 127.0.0.1:PORT")
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(
            f"--listen {text!r}: the local etcd listens on loopback only (127.0.0.1); for several hosts, "
            "run an etcd cluster of 3 or 5 members and give agents --etcd"
        )
    return "127.0.0.1", int(port)


# --- up -----------------------------------------------------------------------------------------------


def up_command(args: argparse.Namespace) -> int:
    from hikkoshi.cluster.errors import EtcdNotInstalled, EtcdProcessError, PortInUse
    from hikkoshi.cluster.etcd_process import etcd_binary
    from hikkoshi.cluster.etcd_supervisor import AlreadyRunning

    try:
        _host, port = parse_loopback(args.listen)
        peer = args.peer_port or port + 1
        if not 0 < peer < 65536 or peer == port:
            raise ValueError(f"--peer-port {peer}: a free port other than the client port")
        if args.max_restarts < 0:
            raise ValueError("--max-restarts: 0 or more")
        etcd_binary()
    except (ValueError, EtcdNotInstalled) as e:
        return _fail(args, str(e))
    state_dir = args.state_dir.absolute()
    try:
        if args.detach:
            return _detach(args, state_dir, port, peer)
        return _foreground(state_dir, port, peer, args.max_restarts)
    except (AlreadyRunning, PortInUse) as e:
        return _fail(args, str(e))
    except EtcdProcessError as e:
        return _fail(args, str(e), 1)
    except KeyboardInterrupt:
        return 130


def _announce(endpoint: str, state_dir: Path, supervisor: int) -> None:
    print(f"etcd is up at http://{endpoint} (data in {state_dir / 'etcd'}, supervisor pid {supervisor})")
    print(f"stop it with: hikkoshi cluster down --state-dir {state_dir}")
    print(f"export HIKKOSHI_ETCD=http://{endpoint}", flush=True)


def _foreground(state_dir: Path, port: int, peer: int, max_restarts: int) -> int:
    import asyncio
    import signal

    from hikkoshi.cluster.etcd_process import EtcdMember
    from hikkoshi.cluster.etcd_supervisor import PidFile, Supervisor, state_dir_lock
    from hikkoshi.daemons.process import run

    member = EtcdMember.single(state_dir, client_port=port, peer_port=peer)

    async def supervise() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        supervisor = Supervisor(
            member,
            PidFile(state_dir),
            max_restarts=max_restarts,
            on_ready=lambda m: _announce(m.spec.endpoint, state_dir, os.getpid()),
        )
        await supervisor.run(stop)

    with state_dir_lock(state_dir):
        _refuse_leftover(state_dir)
        run(supervise())
    print("etcd stopped", flush=True)
    return 0


def _refuse_leftover(state_dir: Path) -> None:
    """An etcd left running by a supervisor that was killed: stop it first (``cluster down``)."""
    from hikkoshi.cluster.etcd_supervisor import AlreadyRunning, PidFile

    info = PidFile(state_dir).read()
    if info is not None and info.etcd is not None and info.etcd.alive():
        raise AlreadyRunning(
            f"an etcd (pid {info.etcd.pid}) left by a supervisor that died still runs under {state_dir}: "
            f"stop it with: hikkoshi cluster down --state-dir {state_dir}"
        )


def _detach(args: argparse.Namespace, state_dir: Path, port: int, peer: int) -> int:
    """Run ``cluster up`` (foreground) as a background process of its own; return once etcd is healthy."""
    from hikkoshi.cluster.etcd_supervisor import LOG_FILE, PidFile, terminate

    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "hikkoshi", *(["-v"] * min(args.verbose, 2))]
    cmd += ["cluster", "up", "--state-dir", str(state_dir), "--listen", f"127.0.0.1:{port}"]
    cmd += ["--peer-port", str(peer), "--max-restarts", str(args.max_restarts)]
    log = state_dir / LOG_FILE
    with log.open("ab") as out:
        child = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True
        )
    pid_file = PidFile(state_dir)
    deadline = time.monotonic() + DETACH_TIMEOUT
    while True:
        code = child.poll()
        if code is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
            print(tail, file=sys.stderr)
            return code or 1
        info = pid_file.read()
        if info is not None and info.supervisor.pid == child.pid and info.etcd is not None:
            _announce(info.endpoint, state_dir, child.pid)
            return 0
        if time.monotonic() > deadline:
            from hikkoshi.cluster.etcd_supervisor import ProcessId

            me = ProcessId.of(child.pid)
            if me is not None:
                terminate(me, 10.0)
            child.wait()
            return _fail(args, f"etcd not up after {DETACH_TIMEOUT:.0f} s; see {log}", 1)
        time.sleep(0.1)


# --- down ---------------------------------------------------------------------------------------------


def down_command(args: argparse.Namespace) -> int:
    from hikkoshi.cluster.etcd_supervisor import stop_supervisor

    state_dir = args.state_dir.absolute()
    info = stop_supervisor(state_dir, within=args.timeout)
    if info is None:
        print(f"no cluster is up under {state_dir}")
        return 0
    print(f"stopped etcd at {info.endpoint} (supervisor pid {info.supervisor.pid})")
    return 0


# --- status -------------------------------------------------------------------------------------------


def status_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import with_store
    from hikkoshi.cli.etcd_options import etcd_urls
    from hikkoshi.cluster.etcd_health import cluster_health
    from hikkoshi.cluster.etcd_supervisor import PidFile

    local: SupervisorInfo | None = None
    if not etcd_urls(args):
        if args.state_dir is None:
            return _fail(args, "which cluster? --state-dir DIR (the local one) or --etcd URL")
        local = PidFile(args.state_dir.absolute()).read()
        if local is None:
            return _fail(args, f"no cluster is up under {args.state_dir.absolute()}", 3)
        args.etcd = f"http://{local.endpoint}"

    async def go(store: Store) -> int:
        health = await cluster_health(store)
        if args.json:
            _print_json(health, local)
        else:
            print("\n".join(_status_lines(health, local)))
        return 0 if health.healthy else 1

    return with_store(args, go)


def _member_dict(m: Any) -> dict[str, Any]:
    st = m.status
    return {
        "name": m.member.name,
        "id": f"{m.member.id:x}",
        "endpoint": m.endpoint,
        "healthy": m.healthy,
        "leader": m.leads,
        **({k: v for k, v in dataclasses.asdict(st).items() if k != "id"} if st else {}),
        "leader_id": f"{st.leader:x}" if st else None,
        "problem": m.problem,
    }


def _print_json(health: ClusterHealth, local: SupervisorInfo | None) -> None:
    from hikkoshi.cli.cluster_session import print_json

    data: dict[str, Any] = {
        "healthy": health.healthy,
        "leader": health.leader,
        "members": [_member_dict(m) for m in health.members],
        "keys": health.counts,
    }
    if local is not None:
        data["supervisor"] = {
            "pid": local.supervisor.pid,
            "etcd_pid": local.etcd.pid if local.etcd else None,
            "endpoint": local.endpoint,
        }
    print_json(data)


def _status_lines(health: ClusterHealth, local: SupervisorInfo | None) -> list[str]:
    from hikkoshi.cli.cluster_tables import table
    from hikkoshi.vm.spec import format_size

    c = health.counts
    lines = [
        f"cluster    {'healthy' if health.healthy else 'NOT healthy'}, leader {health.leader or 'none'}",
        f"keys       hosts {c['hosts']} ({c['hosts-up']} up), VMs {c['vms']}, "
        f"migrations {c['migrations']} ({c['queued']} queued)",
    ]
    if local is not None:
        etcd = f", etcd pid {local.etcd.pid}" if local.etcd else ""
        lines.append(f"local      supervisor pid {local.supervisor.pid}{etcd}")
    rows = []
    for m in health.members:
        st = m.status
        rows.append(
            (
                m.member.name,
                f"{m.member.id:x}",
                m.endpoint or "-",
                "healthy" if m.healthy else "unhealthy",
                "leader" if m.leads else "",
                format_size(st.db_size) if st else "-",
                st.version if st else "-",
                str(st.raft_index) if st else (m.problem or "-"),
            )
        )
    lines += [
        "",
        *table(("MEMBER", "ID", "ENDPOINT", "HEALTH", "ROLE", "DB SIZE", "VERSION", "RAFT INDEX"), rows),
    ]
    return lines
