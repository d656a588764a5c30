"""Hosts whose link can be cut: the network-namespace lab (:mod:`hikkoshi.lab.netns_lab`), each host a
namespace with its own address on a bridge in the root namespace, and its agent inside it (an
:class:`~bench.agent_hosts.AgentHost` that can be killed and started again on the same address).

Cutting a host's link takes its cable's end on the bridge down: every packet to or from the host is
dropped, silently (a blackhole: no reset, no ICMP; connections in flight see nothing and time out,
new ones get no answer), as when a switch port or a cable fails; putting it up again restores the link
with every connection that has not given up meanwhile. A reset instead aborts every TCP connection
between the hosts at once (``ss -K``: the peer gets a RST), and new ones work. Loopback agents cannot
be cut at all, and the WAN emulator relays only the data streams (memory, disks), not the agents' API,
so cutting it would cut half a link; this cuts all of it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.agent_hosts import AgentHost
from hikkoshi.lab.netns_lab import LabPlan, plan_lab, setup_commands, teardown_commands
from hikkoshi.lab.netns_run import run_ip

AGENT_PORT = 8710


def free_lab_number(low: int = 100, high: int = 250) -> int:
    """A lab number whose namespaces and bridge do not exist (out of the way of a user's lab 0)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    for number in range(low, high):
        if f"hkl{number}-" not in listed and f"hkl{number}br" not in links:
            return number
    raise RuntimeError("no free lab number")


class NetnsLab:
    """A lab of hosts (see the module's docstring)."""

    def __init__(self, names: list[str], number: int) -> None:
        self.plan: LabPlan = plan_lab(names, ["default"] * len(names), number)
        self.cut_now: set[int] = set()

    def up(self) -> None:
        run_ip(setup_commands(self.plan))

    def down(self) -> None:
        run_ip(teardown_commands(self.plan), check=False)

    def agent(
        self, i: int, *, logs: Path, state_dir: Path, datastores: dict[str, Path], token: Path
    ) -> AgentHost:
        """The agent of host ``i`` (not started)."""
        h = self.plan.hosts[i]
        return AgentHost(
            h.name, logs, state_dir, datastores, token, address=h.address, port=AGENT_PORT, netns=h.netns
        )

    def cut(self, i: int) -> None:
        """Host ``i`` is cut off from every other (and from the root namespace)."""
        run_ip([["ip", "link", "set", self.plan.hosts[i].veth_root, "down"]])
        self.cut_now.add(i)

    def reset(self, i: int) -> None:
        """Every TCP connection between host ``i`` and the others is reset (aborted here, a RST to the
        peer), as when a middlebox or a link flap drops their state; new connections work at once."""
        ns = self.plan.hosts[i].netns
        for j, other in enumerate(self.plan.hosts):
            if j != i:
                run_ip([["ip", "netns", "exec", ns, "ss", "-K", "dst", other.address]])

    def restore(self, i: int) -> None:
        """Host ``i``'s link is back."""
        run_ip([["ip", "link", "set", self.plan.hosts[i].veth_root, "up"]])
        self.cut_now.discard(i)
