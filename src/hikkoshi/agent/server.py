"""Serving an agent: its API on the address it was given (uvicorn, TLS if configured) until SIGTERM
or SIGINT; then its jobs are cancelled (each rolls back or leaves its record for the next start)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from hikkoshi.agent.api import create_app
from hikkoshi.agent.host import AgentConfig
from hikkoshi.agent.jobs import RouteFactory
from hikkoshi.agent.service import Agent
from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.store import Store
from hikkoshi.daemons.process import dump_tasks
from hikkoshi.vm.home import write_atomically


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: a free one), on exactly ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


async def serve(config: AgentConfig, routes: RouteFactory | None = None) -> int:
    """Run the agent until it is told to stop; the exit status.

    :class:`~hikkoshi.cluster.errors.EtcdUnavailable` before anything listens if a cluster is
    configured and etcd does not answer."""
    if config.cluster is not None:
        await reach_etcd(config.cluster.etcd)
    sock = bind(config.host, config.port)
    config.port = sock.getsockname()[1]
    agent = Agent(config, routes)
    app = create_app(agent)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            log_level="warning",
            access_log=False,
            ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
            ssl_keyfile=str(config.tls_key) if config.tls_key else None,
            timeout_graceful_shutdown=120,
        )
    )
    info = {"name": config.name, "url": config.url, "pid": os.getpid(), "site": config.site}
    write_atomically(Path(config.state_dir) / "agent.json", json.dumps(info).encode())
    # A stuck agent says what it waits on: kill -USR1 <pid> logs every task's chain of awaits.
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGUSR1, dump_tasks, logging.getLogger("hikkoshi.agent")
    )
    print(f"hikkoshi agent {config.name} listening on {config.url}", flush=True)
    await server.serve(sockets=[sock])
    return 0 if server.started else 1


async def reach_etcd(etcd: EtcdConfig) -> None:
    """Read from etcd once (its deadline bounds the wait): :class:`EtcdUnavailable` if it does not answer."""
    async with Store(etcd) as store:
        await store.get(Keys().limits)


def main_error(message: str) -> int:
    """Say why the agent cannot start."""
    print(f"hikkoshi agent: {message}", file=sys.stderr)
    return 2
