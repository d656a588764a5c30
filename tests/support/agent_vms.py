"""A busy test guest driven through an agent's command line only: create and start it, wait on its
console, power it off and verify what it wrote."""

from __future__ import annotations

import re
import time

from hikkoshi.guest.diskwriter import verify_diskwriter_image
from tests.support.agents import AgentProc

_DONE = re.compile(r"HIKKOSHI-DISKWRITER DONE run=(\d+) last=(\d+) written=\d+ records=\d+ OK")


def wait_console(agent: AgentProc, vm: str, pattern: str, timeout: float = 180.0, after: int = 0) -> int:
    """Wait (through the CLI) until the VM's console matches from character ``after``; the match's end."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = agent.cli("vm", "console", vm).stdout
        m = regex.search(text, after)
        if m:
            return m.end()
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} on {vm}'s console:\n{text[-3000:]}")


def create_busy(agent: AgentProc, vm: str, run: int) -> None:
    """Create and start a VM running the ``busy`` workload (disk writer + memory dirtier) as ``run``."""
    agent.cli(
        "vm", "create", vm, "--memory", "192", "--disk", "32M", "--guest", "busy", "--no-nic",
        "--param", f"run={run}", "--param", "progress=4", "--param", "scrub=16", "--param", "rate=4",
        "--param", "mb=24",
    )  # fmt: skip
    agent.cli("vm", "start", vm, timeout=300)
    wait_console(agent, vm, rf"PROGRESS run={run} durable=([89]|\d\d+) ")


def stop_and_verify(agent: AgentProc, vm: str, run: int, after: int) -> None:
    """Power the guest off through the CLI: its own check passes, and the host verifies the disk."""
    agent.cli("vm", "stop", vm, timeout=300)
    text = agent.cli("vm", "console", vm).stdout
    done = _DONE.search(text, after)
    assert done is not None, text[-3000:]
    last = int(done[2])
    disk = agent.datastores["main"] / vm / "disk0.raw"
    assert verify_diskwriter_image(disk, run=run, durable=last).last == last


def vm_names(agent: AgentProc) -> dict[str, str]:
    """The agent's VMs and their states."""
    return {vm["name"]: vm["state"] for vm in agent.json("vm", "list", "--json")}
