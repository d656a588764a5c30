"""A command's session with the cluster: one etcd connection, and every failure as one line and an exit
status (never a traceback).

Exit status of the cluster's commands: 0 done; 1 failed; 2 refused or bad input (an unknown VM or
host, a bad limit); 3 cannot reach what it needs (etcd, or the host that owns the VM is down); 130
interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from hikkoshi.cli.etcd_options import etcd_config
from hikkoshi.cluster.errors import ClusterError, EtcdUnavailable
from hikkoshi.cluster.store import Store
from hikkoshi.daemons.process import run

REFUSED = 2
UNREACHABLE = 3

#: How long a command waits for etcd before it gives up (a person is waiting).
ATTEMPT_TIMEOUT = 2.0
DEADLINE = 5.0


class CommandError(Exception):
    """A command cannot go on: its message, for the person at the keyboard, and its exit status."""

    def __init__(self, message: str, code: int = REFUSED) -> None:
        super().__init__(message)
        self.code = code


def prog(args: argparse.Namespace) -> str:
    """``hikkoshi vm start`` and the like, for messages."""
    words = [args.command]
    for attr in ("vm_command", "host_command", "limits_command", "cluster_command", "action"):
        word = getattr(args, attr, None)
        if isinstance(word, str):
            words.append(word)
    return "hikkoshi " + " ".join(words)


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Say what went wrong on one line; the exit status."""
    print(f"{prog(args)}: {' '.join(message.split())}", file=sys.stderr)
    return code


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


async def open_store(args: argparse.Namespace) -> Store:
    """A connected store for the etcd of ``args`` (:class:`CommandError` for bad options)."""
    try:
        config = etcd_config(args, attempt_timeout=ATTEMPT_TIMEOUT, deadline=DEADLINE)
    except ValueError as e:
        raise CommandError(str(e)) from None
    store = Store(config)
    try:
        await store.connect()
    except BaseException:
        await store.close()
        raise
    return store


def guarded(args: argparse.Namespace, main: Callable[[], Awaitable[int]]) -> int:
    """Run ``main``; cluster errors become one line and an exit status."""

    async def go() -> int:
        return await main()

    try:
        return run(go())
    except CommandError as e:
        return fail(args, str(e), e.code)
    except EtcdUnavailable as e:
        return fail(args, f"etcd does not answer at {', '.join(e.endpoints)}: {e.detail}", UNREACHABLE)
    except (ClusterError, ValueError) as e:
        return fail(args, str(e), REFUSED if isinstance(e, ValueError) else 1)
    except KeyboardInterrupt:
        return 130


def with_store(args: argparse.Namespace, body: Callable[[Store], Awaitable[int]]) -> int:
    """Run ``body`` with a store of the cluster (see :func:`guarded`)."""

    async def main() -> int:
        store = await open_store(args)
        try:
            return await body(store)
        finally:
            await store.close()

    return guarded(args, main)
