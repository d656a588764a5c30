"""One case of the fault campaign, from a fresh busy guest on host A to the verdict (see
:mod:`bench.fault_cases` for the cases and :mod:`bench.run_faults` for the campaign).

A case: the guest boots on A and checks its ring; a migration to B starts and is held at the case's
phase (the jobs' pause hook); the fault is injected and the job let go into it. Then only what the fault
killed is started again: an agent at once (after a short outage), a QEMU with ``vm start`` where the
migration's record says the VM is, once the record says so; a link cut for 5 s comes back after 5 s,
one cut for good after :data:`CUT_HOLD` s (past every deadline), once where the guest runs meanwhile was
recorded. Then the verdict, each part a miss if it fails:

- the record ends (done, rolled back, or refused before anything was touched), within
  :data:`SETTLE_LIMIT` s;
- the VM runs in exactly one place, counted from QEMU processes, and it is where the record says;
- the guest checks its ring twice there (its memory and its disk agree);
- the other side holds nothing of it (no home, process, socket, disk or record), except the disks a
  ``shared`` migration that completed leaves on A for B to read (then A holds exactly that);
- powered off, the guest's final check passes and its disk image verifies.

The VM is then removed (a shared VM is first moved offline home to the host holding its disks).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.agent_hosts import FINAL, AgentHost, ApiError
from bench.busy_guest import BusyGuest, GuestFailed
from bench.fault_cases import Case
from bench.fault_inject import Side, inject, qemu_pid, qemu_state
from bench.host_census import Proc, kill_vm_processes, on_host, processes, qemus
from bench.leftovers import vm_traces
from bench.netns_hosts import NetnsLab
from hikkoshi.vm.home import VmHome

#: How long a link cut for good stays cut: past every deadline (a peer request 15 s, a stalled memory
#: stream 20 s, a stalled mirror 30 s, the guard 10 s, a relocation's patience before the commit 30 s).
CUT_HOLD = 45.0
#: How long a killed agent stays down before it is started again.
AGENT_OUTAGE = 2.0
#: How long a migration may take to end once its fault is over.
SETTLE_LIMIT = 300.0
#: How the clean-up names a failed offline move of a shared VM home to the host holding its disks.
MOVE_HOME = "offline move home to the holder"


@dataclass
class CaseResult:
    """How a case went (the table's row)."""

    case: Case
    migration: str = ""
    outcome: str = ""
    """The record's final phase (``refused``: failed in the precheck, nothing touched)."""
    where: str = ""
    """Where the VM runs at the end (``a``, ``b``; ``a+b`` or ``-`` are misses)."""
    during_cut: str | None = None
    """A link cut for good: where the guest ran while it was cut (QEMU states of A and B)."""
    verified: bool = False
    seconds: float = 0.0
    """From the migration's request until the guest checked itself where it ended."""
    restarted: list[str] = field(default_factory=list)
    error: str | None = None
    """What the record says went wrong (rolled back or recovered)."""
    misses: list[str] = field(default_factory=list)
    cleanup: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        c = self.case
        return {
            "case": c.number,
            "mode": c.mode,
            "phase": c.phase,
            "fault": c.fault,
            "migration": self.migration,
            "outcome": self.outcome,
            "where": self.where,
            "during_cut": self.during_cut,
            "verified": self.verified,
            "seconds": round(self.seconds, 1),
            "restarted": self.restarted,
            "error": self.error,
            "misses": self.misses,
            "cleanup": self.cleanup,
        }


class FaultRunner:
    """Runs cases between two agents (A the source, B the destination)."""

    def __init__(
        self, a: AgentHost, b: AgentHost, pause_dir: Path, lab: NetnsLab | None, memory_mib: int = 160
    ) -> None:
        self.a, self.b = a, b
        self.pause_dir = pause_dir
        self.lab = lab
        self.memory_mib = memory_mib

    def run(self, case: Case) -> CaseResult:
        result = CaseResult(case)
        name = f"f{case.number:03d}"
        guest = BusyGuest(name, random.randrange(1, 2**31), memory_mib=self.memory_mib)
        src = Side(0, self.a, VmHome(self.a.datastores["main"] / name))
        dst = Side(1, self.b, VmHome(self.b.datastores["main"] / name))
        uuid = ""
        try:
            guest.create(self.a.api)
            uuid = str(self.a.api.vms()[name]["uuid"])
            self._run(case, result, guest, src, dst, uuid)
        except (GuestFailed, RuntimeError, TimeoutError, ApiError) as exc:
            result.misses.append(f"{type(exc).__name__}: {exc}")
        finally:
            for host in (self.a, self.b):
                if host.pid is None:
                    host.start()  # never leave the next case without an agent
            if self.lab is not None:
                for i in list(self.lab.cut_now):
                    self.lab.restore(i)
            if result.misses:
                self._keep_logs(name, src, dst)
            result.cleanup += self._remove(name, src, dst, result)
            # A VM that cannot move again is no success: the move home to the host holding its disks
            # (shared storage) must work like any other.
            result.misses += [c for c in result.cleanup if c.startswith(MOVE_HOME)]
        return result

    # --- the case ------------------------------------------------------------------------------------------

    def _run(self, case: Case, result: CaseResult, guest: BusyGuest, src: Side, dst: Side, uuid: str) -> None:
        at = self.pause_dir / "pause-at"
        at.write_text(case.phase)
        t0 = time.monotonic()
        try:
            result.migration = self.a.api.migrate(
                guest.name, self.b.url, storage=case.storage, mode=case.kind
            )
            marker = self.pause_dir / f"{result.migration}.paused"
            deadline = time.monotonic() + 300
            while not marker.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the migration never reached {case.phase}")
                time.sleep(0.02)
        finally:
            at.unlink(missing_ok=True)
        injected = inject(case.fault, src, dst, uuid, self.lab)
        marker.unlink(missing_ok=True)  # the job goes on into the fault
        if injected.agent_down is not None:
            time.sleep(AGENT_OUTAGE)
            injected.agent_down.start()
            result.restarted.append(f"agent {injected.agent_down.name}")
        if injected.cut is not None and self.lab is not None:
            if case.fault == "cut-5s":
                time.sleep(5.0)
            else:
                result.during_cut = self._watch_cut(src, dst)
            self.lab.restore(injected.cut)
        info = self._settle(case, result, guest.name, src, dst, uuid)
        result.outcome = _outcome(info)
        result.error = info.get("error")
        there = self._check_place(result, info, src, dst, uuid)
        if there is None:
            return
        api = there.agent.api
        try:
            guest.wait_checked(api, guest.console_size(api), timeout=240)
        except GuestFailed as exc:
            result.misses.append(str(exc))
            return
        result.seconds = time.monotonic() - t0
        shared_done = case.storage == "shared" and result.outcome == "done"
        procs = processes()
        for side in (src, dst):
            role = "runs" if side is there else "holds" if shared_done else None
            remote = shared_done and side is there
            problems = vm_traces(side.agent, vm=guest.name, uuid=uuid, role=role, remote=remote, procs=procs)
            result.misses += [f"{side.name}: {p}" for p in problems]
        disk_home = src.home if shared_done else there.home
        try:
            guest.stop_and_verify(api, disk_home.path.parent)
            result.verified = True
        except GuestFailed as exc:
            result.misses.append(str(exc))

    def _watch_cut(self, src: Side, dst: Side) -> str:
        """Hold the cut for :data:`CUT_HOLD` s; where the guest runs at its end (QEMU states)."""
        time.sleep(CUT_HOLD)
        return f"a:{qemu_state(src) or '-'} b:{qemu_state(dst) or '-'}"

    def _settle(
        self, case: Case, result: CaseResult, name: str, src: Side, dst: Side, uuid: str
    ) -> dict[str, Any]:
        """Wait until the migration ended; a QEMU killed by the case is started again (once) where the
        record says the VM is, once it says so."""
        deadline = time.monotonic() + SETTLE_LIMIT
        info: dict[str, Any] = {}
        missing_since: float | None = None
        while time.monotonic() < deadline:
            try:
                info = self.a.api.migration(result.migration)
            except ApiError as exc:
                if exc.status:
                    raise
                time.sleep(0.5)
                continue
            final = info["phase"] in FINAL and not info["running"]
            if case.fault.endswith("-qemu") and not result.restarted:
                place = _recorded_place(info, src, dst)
                if place is not None and qemu_pid(place, uuid) is None and (final or not info["running"]):
                    missing_since = missing_since or time.monotonic()
                    # A migration that ended is not waited for again: the VM is started at once (its
                    # supervisor given a moment to end first).
                    if time.monotonic() - missing_since > 3.0 or final:
                        if final:
                            _wait_stopped(place)
                        place.agent.api.start(name)
                        result.restarted.append(f"vm start on {place.name}")
                else:
                    missing_since = None
            if final:
                return info
            time.sleep(0.5)
        result.misses.append(f"the migration did not end within {SETTLE_LIMIT:.0f} s: {info.get('phase')}")
        return info

    def _check_place(
        self, result: CaseResult, info: dict[str, Any], src: Side, dst: Side, uuid: str
    ) -> Side | None:
        """Exactly one QEMU of the VM, where the record says it is; that side."""
        found = qemus(uuid)
        sides = [s for s in (src, dst) if any(p.mentions(str(s.home.path) + "/") for p in found)]
        result.where = "+".join(s.name for s in sides) or "-"
        if len(found) != 1 or len(sides) != 1:
            result.misses.append(f"{len(found)} QEMUs of the VM ({result.where})")
            return None
        expected = _recorded_place(info, src, dst)
        if result.outcome not in ("done", "rolled-back", "refused"):
            result.misses.append(f"the migration ended {result.outcome}: {info.get('error')}")
        if expected is not sides[0]:
            result.misses.append(
                f"the VM runs on {sides[0].name}, the record says {expected and expected.name}"
            )
        return sides[0]

    # --- cleaning up ---------------------------------------------------------------------------------------

    def _keep_logs(self, name: str, src: Side, dst: Side) -> None:
        """A missed case's VM logs (QEMU, supervisor, disk service, console), kept beside the agents'
        logs before the VM is removed: what went wrong is told there."""
        for side in (src, dst):
            if not side.home.path.is_dir():
                continue
            keep = self.pause_dir.parent / "logs" / name / side.name
            keep.mkdir(parents=True, exist_ok=True)
            for item in side.home.path.iterdir():
                if item.name.endswith((".log", ".log.1", ".json", ".pid")):
                    with contextlib.suppress(OSError):
                        shutil.copy2(item, keep / item.name)

    @staticmethod
    def _gone_soon(home: Path, seconds: float = 5.0) -> list[Proc]:
        """The processes of the VM whose home this was, once given ``seconds`` to exit: a supervisor
        frees the VM's run lock (``vm stop`` returns) a moment before its process ends."""
        deadline = time.monotonic() + seconds
        while (left := on_host(processes(), [home], bare=True)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def _remove(self, name: str, src: Side, dst: Side, result: CaseResult) -> list[str]:
        """Remove the VM through the agents; by pid and path if that fails (and say so)."""
        problems = []
        try:
            vms = {h.name: h.api.vms().get(name) for h in (self.a, self.b)}
            if result.outcome == "done" and result.case.storage == "shared" and vms["b"] is not None:
                if vms["b"]["running"]:
                    self.b.api.stop(name)
                moved = self.b.api.migrate(name, self.a.url, mode="offline")
                info = self.b.api.wait_final(moved, 300)
                if info["phase"] != "done":
                    problems.append(f"{MOVE_HOME}: {info['phase']}: {info['error']}")
                vms = {h.name: h.api.vms().get(name) for h in (self.a, self.b)}
            for host in (self.a, self.b):
                row = vms[host.name]
                if row is None:
                    continue
                if row["running"]:
                    host.api.stop(name, timeout=10)
                host.api.destroy(name)
        except (ApiError, TimeoutError) as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        for side in (src, dst):
            left = self._gone_soon(side.home.path)
            if side.home.path.exists() or left:
                files = sorted(p.name for p in side.home.path.iterdir()) if side.home.path.is_dir() else []
                procs = [str(p) for p in left]
                problems.append(f"{side.home.path} was left ({files}, processes {procs}): removed by hand")
                kill_vm_processes([side.home.path], bare=True)
                with contextlib.suppress(OSError):
                    shutil.rmtree(side.home.path)
        return problems


def _outcome(info: dict[str, Any]) -> str:
    phase = str(info.get("phase", ""))
    if phase == "failed" and str(info.get("error") or "").startswith("refused"):
        return "refused"
    return phase


def _recorded_place(info: dict[str, Any], src: Side, dst: Side) -> Side | None:
    """Where the migration's record says the VM is (``None``: it does not say yet)."""
    phase = info.get("phase")
    facts = (info.get("record") or {}).get("facts") or {}
    if (
        phase == "done"
        or facts.get("committed")
        or phase in ("resume-destination", "announce", "storage-post", "cleanup")
    ):
        return dst
    if phase in ("rolled-back",) or (
        phase == "failed" and str(info.get("error") or "").startswith("refused")
    ):
        return src
    return None


def _wait_stopped(side: Side, seconds: float = 15.0) -> None:
    """Until the VM's supervisor on that side has ended (its QEMU died), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while side.home.path.exists() and side.home.is_running() and time.monotonic() < deadline:
        time.sleep(0.1)
