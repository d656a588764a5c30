"""What a host holds of a VM, and of anything else: after any number of moves and faults a host keeps
exactly what runs or is held there now. Read from the kernel and the file system
(:mod:`host_census`), and from the agent only for its own records (the VM's row, no migration of it in
flight).

A VM's role on a host: ``runs`` (its home, supervisor, QEMU and disk service; no TCP port),
``holds`` (it runs elsewhere with its disks here, shared storage: its home with the disks, a supervisor
and a disk service serving them on one port, no QEMU) or ``None`` (nothing of it at all).
"""

from __future__ import annotations

import glob
from pathlib import Path

from bench.agent_hosts import FINAL, AgentHost
from bench.host_census import Proc, listening_ports, on_host, processes, sockets_under, stray_files

#: The sockets a running VM's runtime directory holds (a holder's has no QMP socket).
VM_SOCKETS = frozenset({"qmp.sock", "nbd.sock", "nbd-control.sock", "supervisor.sock"})
#: Scratch directories of migrations (disk pulls, cold moves), under /tmp.
SCRATCH = ("/tmp/hk-pull-*", "/tmp/hk-cold-*")
#: The agent's word for a VM in each role.
AGENT_STATE = {"runs": "running", "holds": "serving"}


def scratch_dirs() -> set[str]:
    """The migrations' scratch directories that exist now."""
    return {path for pattern in SCRATCH for path in glob.glob(pattern)}


def home_of(host: AgentHost, vm: str) -> Path | None:
    """The VM's home on ``host``, if it has one (the first datastore holding one)."""
    for path in host.datastores.values():
        if (path / vm).is_dir():
            return path / vm
    return None


def vm_traces(
    host: AgentHost,
    *,
    vm: str,
    uuid: str,
    role: str | None,
    remote: bool = False,
    procs: list[Proc] | None = None,
    agent: bool = True,
) -> list[str]:
    """What ``host`` holds of the VM beyond what ``role`` allows (see the module's docstring).
    ``remote``: the VM's disks are held by another host (its home keeps the disk plan that says so).
    ``agent``: also ask the agent (it must answer)."""
    procs = processes() if procs is None else procs
    problems: list[str] = []
    homes = [path / vm for path in host.datastores.values() if (path / vm).is_dir()]
    if len(homes) != (1 if role else 0):
        problems.append(f"{vm} has {len(homes)} homes here ({[str(h) for h in homes]}), though it {role}")
    # A disk plan stays where the disks are held elsewhere (``remote``), and where this host holds them
    # for another (its listener for that host, kept so that a restarted disk service listens again).
    plan = remote or role == "holds"
    for home in homes:
        problems += [p for p in stray_files(home.parent, vm, plan) if p.startswith(str(home))]
        if role == "holds" and not (home / "disk0.raw").exists():
            problems.append(f"{home} holds no disk")
    rundir = host.runtime_dir / uuid
    if rundir.exists() and not role:
        problems.append(f"{rundir} is left over")
    sockets = VM_SOCKETS if role == "runs" else VM_SOCKETS - {"qmp.sock"}
    problems += [f"socket {s} is left over" for s in sockets_under(rundir) if s.name not in sockets]
    mine = on_host(procs, [rundir, *(path / vm for path in host.datastores.values())], bare=True)
    qemus = [p for p in mine if p.is_qemu]
    want_qemus, most = {"runs": (1, 3), "holds": (0, 2)}.get(role or "", (0, 0))
    if len(qemus) != want_qemus:
        problems.append(f"{len(qemus)} QEMUs of {vm} here, expected {want_qemus}: {[str(p) for p in qemus]}")
    if len(mine) > most:  # the supervisor, QEMU and the disk service
        problems += [f"process {p} is one too many" for p in mine]
    ports = {p.pid: ports for p in mine if (ports := listening_ports(p.pid))}
    if sum(len(v) for v in ports.values()) > (1 if role == "holds" else 0):
        problems.append(f"processes of {vm} listen on TCP: {ports}")
    if agent:
        row = host.api.vms().get(vm)
        state = None if row is None else row["state"]
        if state != AGENT_STATE.get(role or ""):
            problems.append(f"the agent says {vm} is {state}, expected {AGENT_STATE.get(role or '')}")
        for m in host.api.get("/v1/migrations", params={"vm": vm}):
            if m["running"] or m["phase"] not in FINAL:
                problems.append(f"migration {m['id']} of {vm} is still {m['phase']} (running={m['running']})")
    return problems


def host_leftovers(
    host: AgentHost,
    *,
    vm: str,
    uuid: str,
    role: str | None,
    remote: bool = False,
    procs: list[Proc] | None = None,
) -> list[str]:
    """Everything on ``host`` beyond its agent and what ``role`` allows of the one VM ``vm``: its traces
    (:func:`vm_traces`), and no other home, runtime directory, socket, VM process, port or record."""
    procs = processes() if procs is None else procs
    problems = vm_traces(host, vm=vm, uuid=uuid, role=role, remote=remote, procs=procs)
    plan = remote or role == "holds"
    for path in host.datastores.values():
        problems += stray_files(path, None) if not (path / vm).is_dir() else stray_files(path, vm, plan)
    problems = list(dict.fromkeys(problems))  # the VM's home files are checked twice
    if host.runtime_dir.exists():
        for entry in sorted(host.runtime_dir.iterdir()):
            if entry.name != uuid:
                problems.append(f"{entry} is left over")
    rundir = host.runtime_dir / uuid
    for sock in sockets_under(host.state_dir):
        if sock.parent != rundir:
            problems.append(f"socket {sock} is left over")
    vm_paths = [rundir, *(path / vm for path in host.datastores.values())]
    for proc in on_host(procs, [host.state_dir, *host.datastores.values()]):
        if not any(proc.names_path(p) for p in vm_paths):
            problems.append(f"process {proc} is left over")
    if host.pid is not None:
        own = listening_ports(host.pid)
        if own != [host.port]:
            problems.append(f"the agent listens on {own}, not only its API port {host.port}")
    vms = {name: v["state"] for name, v in host.api.vms().items()}
    want = {vm: AGENT_STATE[role]} if role else {}
    if vms != want:
        problems.append(f"the agent lists {vms}, expected {want}")
    for m in host.api.migrations():
        if m["running"] or m["phase"] not in FINAL:
            problems.append(f"migration {m['id']} is still {m['phase']} (running={m['running']})")
    return list(dict.fromkeys(problems))
