"""Injecting a campaign's faults, and the one thing done by hand after each: start again what was
killed (an agent on its state dir; a QEMU with ``vm start`` where the migration's record says the VM
is), or bring a cut link back. Everything else is the code under test's business.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from bench.agent_hosts import AgentHost
from bench.host_census import on_host, processes
from bench.netns_hosts import NetnsLab
from hikkoshi.daemons import supervisor_client
from hikkoshi.vm.home import VmHome


@dataclass
class Side:
    """One host of a case, and the VM's home there."""

    index: int
    agent: AgentHost
    home: VmHome

    @property
    def name(self) -> str:
        return self.agent.name


@dataclass
class Injected:
    """What a fault did."""

    killed_pid: int | None = None
    agent_down: AgentHost | None = None
    cut: int | None = None
    notes: list[str] = field(default_factory=list)


def qemu_pid(side: Side, uuid: str) -> int | None:
    """The VM's QEMU on that side, if there is one."""
    roots = [side.agent.state_dir / "run" / uuid, side.home.path]
    found = [p for p in on_host(processes(), roots) if p.is_qemu]
    return found[0].pid if found else None


def disk_service_pid(side: Side) -> int | None:
    """The VM's disk service on that side (its supervisor's record), if it runs."""
    pid = side.home.read_state().get("nbd_pid")
    if not isinstance(pid, int):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"hikkoshi.daemons.disk_service" in argv and str(side.home.path).encode() in argv else None


def inject(fault: str, src: Side, dst: Side, uuid: str, lab: NetnsLab | None) -> Injected:
    """Inject ``fault`` now (the job is held at its phase)."""
    done = Injected()
    side = src if "-src-" in fault else dst
    if fault.endswith("-agent"):
        code = side.agent.stop(signal.SIGKILL)
        done.agent_down = side.agent
        done.notes.append(f"agent {side.name} killed ({code})")
    elif fault.endswith("-qemu") or fault.endswith("-disks"):
        pid = qemu_pid(side, uuid) if fault.endswith("-qemu") else disk_service_pid(side)
        if pid is None:
            raise RuntimeError(f"{fault}: nothing to kill on {side.name}")
        os.kill(pid, signal.SIGKILL)
        done.killed_pid = pid
        done.notes.append(f"{fault.split('-')[-1]} pid {pid} on {side.name} killed")
    elif fault == "reset":
        if lab is None:
            raise RuntimeError("resetting a link needs the network-namespace lab")
        lab.reset(dst.index)
        done.notes.append(f"{dst.name}'s connections reset")
    elif fault.startswith("cut"):
        if lab is None:
            raise RuntimeError("cutting a link needs the network-namespace lab")
        lab.cut(dst.index)
        done.cut = dst.index
        done.notes.append(f"{dst.name}'s link cut")
    else:
        raise ValueError(f"no fault {fault!r}")
    return done


def qemu_state(side: Side) -> str | None:
    """QEMU's run state on that side, asked of its supervisor over its Unix socket (which a cut link
    does not cut); ``None``: no VM there."""
    home = side.home
    if not home.path.exists() or not home.is_running():
        return None
    try:
        status = asyncio.run(supervisor_client.vm_status(home, home.load_spec()))
    except Exception:  # the supervisor is going or coming: no answer is an answer
        return "unknown"
    return str(status.get("state")) if status.get("qemu_pid") else "no-qemu"
