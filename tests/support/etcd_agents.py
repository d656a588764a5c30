"""Agents in one cluster on a real etcd member, for the CLI's real-guest tests: started together,
stopped together (agents and their VMs by pid, then etcd, whose process must be gone), and the CLI run
in this process against them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hikkoshi.cluster.etcd_process import EtcdMember
from tests.support.agents import AgentProc, agents
from tests.support.cluster_cli import Result, in_process
from tests.support.etcd import gone, start_member


@contextlib.contextmanager
def etcd_agents(
    root: Path, *names: str, datastores: tuple[str, ...] = ("main",), extra: Sequence[str] = ()
) -> Iterator[tuple[EtcdMember, str, list[AgentProc]]]:
    """An etcd member, its URL and agents ``names`` joined to it (with ``extra`` options)."""
    member = start_member(root)
    pid = member.pid
    assert pid is not None
    url = f"http://{member.spec.endpoint}"
    try:
        with agents(root, *names, datastores=datastores, extra=["--etcd", url, *extra]) as procs:
            yield member, url, procs
    finally:
        member.stop_sync()
        assert gone(pid)


def cluster_cli(capsys: Any, url: str, agent: AgentProc, *args: str) -> Result:
    """``hikkoshi --etcd URL --token-file F [--ca-file F] ARGS`` with ``agent``'s token and CA."""
    ca = ["--ca-file", str(agent.ca_file)] if agent.ca_file else []
    return in_process(capsys, "--etcd", url, "--token-file", str(agent.token_file), *ca, *args)
