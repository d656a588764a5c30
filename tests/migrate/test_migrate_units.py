"""Pure parts of live migration: phases and their rules, the convergence schedule, storage modes, prechecks,
the persisted record, the incoming disk plan, and the proxy's source map after an invalidation."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pydantic import ValidationError

from hikkoshi.block.proxy import _overlay_data
from hikkoshi.migrate import qmp_migration as qm
from hikkoshi.migrate.convergence import (
    Action,
    Observation,
    Progress,
    Schedule,
    build_schedule,
    decide,
)
from hikkoshi.migrate.destination import LocalDestination
from hikkoshi.migrate.job import Job, MigrationPending, Step
from hikkoshi.migrate.live import LiveMigration, LiveRequest
from hikkoshi.migrate.phases import FINAL, FORWARD, Phase, PhaseError, can_move, committed, move, recovery
from hikkoshi.migrate.precheck import Side, migration_problems
from hikkoshi.migrate.record import Endpoint, MigrationRecord, MigrationStore, PhaseTime
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.migrate.storage import MoveContext, strategy
from hikkoshi.migrate.storage_modes import StorageMode, bitmap_name
from hikkoshi.vm.disk_serving import PLAN_FILE, DiskPlan, DiskServing, Holder, Serving
from hikkoshi.vm.errors import VmStartError
from hikkoshi.vm.facts import CpuFacts, HostFacts, MemoryFacts
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.precheck import QEMU_OVERHEAD
from hikkoshi.vm.spec import VmSpec, parse_spec

MIB = 1 << 20
GIB = 1 << 30

# --- phases ------------------------------------------------------------------------------------------------

_BEFORE_COMMIT = FORWARD[: FORWARD.index(Phase.RESUME)]


def allowed_by_the_docs(current: Phase, target: Phase) -> bool:
    """The transition rules as the module's docstring states them, written independently of the code."""
    if current in (Phase.DONE, Phase.ROLLED_BACK, Phase.FAILED):
        return False  # final
    if target == Phase.FAILED:
        return True  # the last word, from anywhere not final
    if current == Phase.ROLLBACK:
        return target == Phase.ROLLED_BACK
    if target == Phase.ROLLED_BACK:
        return False  # only a rollback ends rolled back
    if target == Phase.ROLLBACK:
        return current in _BEFORE_COMMIT  # nobody may resume the source once the destination may have run
    return FORWARD.index(target) > FORWARD.index(current)  # forward only (skipping is allowed)


def documented_recovery(phase: Phase) -> str:
    if phase in (Phase.DONE, Phase.ROLLED_BACK):
        return "nothing"
    if phase == Phase.FAILED:
        return "inspect"
    if phase == Phase.ROLLBACK or phase in _BEFORE_COMMIT:
        return "rollback"
    return "finish"


@pytest.mark.parametrize("current", list(Phase))
@pytest.mark.parametrize("target", list(Phase))
def test_every_transition_follows_the_documented_rules(current: Phase, target: Phase) -> None:
    allowed = allowed_by_the_docs(current, target)
    assert can_move(current, target) == allowed
    if allowed:
        assert move(current, target) is target
    else:
        with pytest.raises(PhaseError, match=f"from {current} to {target}"):
            move(current, target)


@pytest.mark.parametrize("phase", list(Phase))
def test_recovery_of_every_phase(phase: Phase) -> None:
    assert recovery(phase) == documented_recovery(phase)
    # Committed means: from resume on (and a failed migration, which may have got there).
    assert committed(phase) == (
        phase == Phase.FAILED or (phase in FORWARD and FORWARD.index(phase) >= FORWARD.index(Phase.RESUME))
    )
    if phase in FINAL:
        assert not any(can_move(phase, t) for t in Phase)
    if committed(phase):
        assert not can_move(phase, Phase.ROLLBACK)
        assert recovery(phase) != "rollback"


def test_the_successful_path_is_allowed_step_by_step() -> None:
    phase = FORWARD[0]
    for nxt in FORWARD[1:]:
        phase = move(phase, nxt)
    assert phase == Phase.DONE and recovery(phase) == "nothing"
    # Rolling back is possible up to the switchover, and not from resume on.
    for p in FORWARD:
        assert can_move(p, Phase.ROLLBACK) == (p in _BEFORE_COMMIT)
    assert _BEFORE_COMMIT[-1] == Phase.SWITCHOVER


def _endpoint(root: str) -> Endpoint:
    return Endpoint(datastore=Path(f"/{root}"), home=Path(f"/{root}/vm1"))


def new_record(**changes: Any) -> MigrationRecord:
    fields: dict[str, Any] = {
        "vm": "vm1",
        "storage": StorageMode.HYBRID,
        "source": _endpoint("a"),
        "destination": _endpoint("b"),
    }
    fields.update(changes)
    return MigrationRecord(**fields)


class PhaseWalk(RuleBasedStateMachine):
    """Random walks over the phases, checked against the documented rules, with a record kept alongside.

    Model: the current phase and the path so far. Invariants: the path never goes back in FORWARD order;
    once committed it never reaches rollback (or rolled-back); final phases end the walk; the record holds
    the path with consistent timing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = 1_000_000.0
        self.phase = Phase.PRECHECK
        self.path = [Phase.PRECHECK]
        self.record = new_record(created=self.clock)
        # As the coordinator does: the precheck is timed from the start.
        self.record.phases = [PhaseTime(phase=Phase.PRECHECK, started=self.clock)]

    def _go(self, target: Phase, dt: float) -> None:
        self.clock += dt
        allowed = allowed_by_the_docs(self.phase, target)
        assert can_move(self.phase, target) == allowed
        before = self.record.model_dump()
        if not allowed:
            with pytest.raises(PhaseError):
                move(self.phase, target)
            with pytest.raises(PhaseError):
                self.record.enter(target, now=self.clock)
            assert self.record.model_dump() == before  # a refused transition changes nothing
            return
        assert move(self.phase, target) is target
        self.record.enter(target, now=self.clock)
        self.phase = target
        self.path.append(target)

    @rule(goal=st.sampled_from(Phase), dt=st.floats(0, 500, allow_nan=False))
    def try_any(self, goal: Phase, dt: float) -> None:
        self._go(goal, dt)

    @precondition(lambda self: self.phase not in FINAL)
    @rule(data=st.data(), dt=st.floats(0, 500, allow_nan=False))
    def take_an_allowed_step(self, data: st.DataObject, dt: float) -> None:
        options = [t for t in Phase if allowed_by_the_docs(self.phase, t)]
        assert options  # a phase that is not final always has a way out (failed, at least)
        self._go(data.draw(st.sampled_from(options)), dt)

    @precondition(lambda self: self.phase in FORWARD and self.phase != Phase.DONE)
    @rule(dt=st.floats(0, 500, allow_nan=False))
    def next_forward(self, dt: float) -> None:
        self._go(FORWARD[FORWARD.index(self.phase) + 1], dt)

    @invariant()
    def never_backwards(self) -> None:
        forward = [FORWARD.index(p) for p in self.path if p in FORWARD]
        assert forward == sorted(set(forward))  # strictly rising

    @invariant()
    def no_rollback_after_commit(self) -> None:
        for i, p in enumerate(self.path):
            if committed(p):
                later = self.path[i:]
                assert Phase.ROLLBACK not in later and Phase.ROLLED_BACK not in later
                assert all(committed(q) for q in later)  # a commit is never undone
            if p == Phase.ROLLED_BACK:
                assert self.path[i - 1] == Phase.ROLLBACK
            if p == Phase.ROLLBACK:
                assert all(q in (Phase.ROLLBACK, Phase.ROLLED_BACK, Phase.FAILED) for q in self.path[i:])

    @invariant()
    def finals_end_the_walk(self) -> None:
        for p in self.path[:-1]:
            assert p not in FINAL
        if self.phase in FINAL:
            assert not any(can_move(self.phase, t) for t in Phase)

    @invariant()
    def recovery_matches(self) -> None:
        assert recovery(self.phase) == documented_recovery(self.phase)

    @invariant()
    def record_follows(self) -> None:
        r = self.record
        assert r.phase == self.phase
        assert [t.phase for t in r.phases] == self.path
        for a, b in itertools.pairwise(r.phases):
            assert b.started >= a.started
            assert a.seconds == round(b.started - a.started, 4)
        last = r.phases[-1]
        if self.phase in FINAL:
            assert last.seconds == 0.0 and r.finished == last.started
        else:
            assert last.seconds is None and r.finished is None
        # Each phase is entered at most once, so phase_seconds has one entry per timed phase.
        timed = {t.phase.value: t.seconds for t in r.phases if t.seconds is not None}
        assert r.phase_seconds() == timed


TestPhaseWalk = PhaseWalk.TestCase
TestPhaseWalk.settings = settings(max_examples=80, stateful_step_count=25, deadline=None)


# --- convergence: the schedule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"downtime_ms": ()},
        {"downtime_ms": (0, 100)},
        {"downtime_ms": (-5,)},
        {"downtime_ms": (100, 50)},
        {"downtime_ms": (50, 50, 100)},
        {"downtime_ms": (50,), "throttle_percent": (20, 20)},
        {"downtime_ms": (50,), "throttle_percent": (0, 20)},
        {"downtime_ms": (50,), "throttle_percent": (20, 100)},
        {"downtime_ms": (50,), "throttle_percent": (40, 20)},
        {"downtime_ms": (50,), "stall_iterations": 0},
        {"downtime_ms": (50,), "shrink": 0.0},
        {"downtime_ms": (50,), "shrink": 1.01},
        {"downtime_ms": (50,), "max_seconds": 0.0},
        {"downtime_ms": (50,), "max_seconds": -1.0},
    ],
)
def test_bad_schedules_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Schedule(**fields)


def test_good_schedule_edges_are_accepted() -> None:
    s = Schedule((1,), (1, 99), stall_iterations=1, shrink=1.0, max_seconds=0.001)
    assert s.throttle_percent == (1, 99)


@pytest.mark.parametrize(
    ("max_ms", "kwargs"), [(0, {}), (-1, {}), (300, {"start_ms": 0}), (300, {"start_ms": -5})]
)
def test_build_schedule_refuses_bad_input(max_ms: int, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build_schedule(max_ms, **kwargs)


@given(
    max_ms=st.integers(1, 100_000),
    steps=st.integers(1, 10),
    start=st.integers(1, 5_000),
    auto_converge=st.booleans(),
    postcopy=st.booleans(),
)
@settings(max_examples=200)
def test_build_schedule(max_ms: int, steps: int, start: int, auto_converge: bool, postcopy: bool) -> None:
    s = build_schedule(
        max_ms, steps=steps, start_ms=start, auto_converge=auto_converge, allow_postcopy=postcopy
    )
    levels = s.downtime_ms
    assert all(a < b for a, b in itertools.pairwise(levels))  # strictly rising
    assert levels[0] == (min(start, max_ms) if steps >= 2 else max_ms)
    assert levels[-1] == max_ms  # the user's maximum is the last step (the only one with steps=1)
    assert 1 <= len(levels) <= max(1, steps)
    assert bool(s.throttle_percent) == auto_converge
    if auto_converge:
        assert s.throttle_percent == (20, 40, 60, 80)
    assert s.allow_postcopy == postcopy


def test_default_schedule() -> None:
    s = build_schedule(300)
    assert s.downtime_ms[0] == 50 and s.downtime_ms[-1] == 300 and len(s.downtime_ms) == 4
    assert build_schedule(30).downtime_ms == (30,)  # the maximum below the start: one step


# --- convergence: decisions --------------------------------------------------------------------------------


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    downtime = sorted(draw(st.sets(st.integers(1, 10_000), min_size=1, max_size=5)))
    throttle = sorted(draw(st.sets(st.integers(1, 99), max_size=4)))
    return Schedule(
        tuple(downtime),
        tuple(throttle),
        allow_postcopy=draw(st.booleans()),
        stall_iterations=draw(st.integers(1, 4)),
        shrink=draw(st.sampled_from([0.5, 0.9, 0.95, 1.0])),
        max_seconds=draw(st.floats(1, 500)),
    )


#: Remaining bytes: mostly a few close values, so that stalls (and escalations) are common.
remainders = st.one_of(st.sampled_from([0, 1000, 1010, 1030, 900, 5000]), st.integers(0, 1 << 34))


@st.composite
def observation_runs(draw: st.DrawFn, max_len: int = 60) -> list[Observation]:
    n = draw(st.integers(0, max_len))
    iteration = draw(st.integers(0, 3))
    elapsed = 0.0
    out = []
    for _ in range(n):
        iteration += draw(st.sampled_from([0, 1, 1, 1, 2, 5]))
        elapsed += draw(st.floats(0.001, 40))
        out.append(Observation(iteration, draw(remainders), elapsed))
    return out


def ladder(s: Schedule) -> list[tuple[str, int]]:
    """Every escalation, in order, for a migration that never converges (the last one ends it)."""
    steps = [("set-downtime", d) for d in s.downtime_ms[1:]] + [("throttle", t) for t in s.throttle_percent]
    return [*steps, ("postcopy", 0) if s.allow_postcopy else ("abort", 0)]


def drive(s: Schedule, observations: list[Observation]) -> list[tuple[Observation, Action]]:
    """Feed observations as the coordinator does: until an abort ends the migration."""
    p = Progress()
    out = []
    for obs in observations:
        p, action = decide(s, p, obs)
        out.append((obs, action))
        if action.kind == "abort":
            break
    return out


@given(s=schedules(), observations=observation_runs())
@settings(max_examples=300)
def test_decisions_on_any_observations(s: Schedule, observations: list[Observation]) -> None:
    steps = drive(s, observations)
    seen: set[int] = set()
    acted_on: set[int] = set()
    postcopy = False
    escalations: list[tuple[str, int]] = []  # steps of the schedule, taken because memory stalled
    timed: list[tuple[str, int]] = []  # what the time limit did
    for obs, action in steps:
        new = not seen or obs.iteration > max(seen)
        if postcopy:
            assert action.kind == "continue"  # (f) post-copy always finishes
        elif obs.elapsed > s.max_seconds:
            # (e) past the time limit: post-copy if allowed, else give up.
            assert action.kind == ("postcopy" if s.allow_postcopy else "abort")
            timed.append((action.kind, action.value))
        elif action.kind != "continue":
            # (a) an escalation answers a new iteration after the first two passes, and only once.
            assert new and obs.iteration >= 2 and obs.iteration not in acted_on
            acted_on.add(obs.iteration)
            assert not timed
            escalations.append((action.kind, action.value))
        if action.kind != "continue":
            assert action.reason
        postcopy = postcopy or action.kind == "postcopy"
        seen.add(obs.iteration)
    # (c) the escalations follow the schedule's order; only the time limit may cut it short, once.
    assert escalations == ladder(s)[: len(escalations)]
    assert len(timed) <= 1
    # (b) downtime limits come from the schedule, strictly rising, never above the maximum.
    downtimes = [v for k, v in escalations if k == "set-downtime"]
    assert all(a < b for a, b in itertools.pairwise(downtimes))
    assert all(v in s.downtime_ms[1:] and v <= s.downtime_ms[-1] for v in downtimes)
    # Nothing after an abort; with post-copy allowed there is never an abort.
    kinds = [a.kind for _, a in steps]
    if "abort" in kinds:
        assert kinds.index("abort") == len(kinds) - 1 and not s.allow_postcopy
    assert kinds.count("postcopy") <= 1


@given(s=schedules(), observations=observation_runs(), data=st.data())
@settings(max_examples=100)
def test_asking_again_about_an_iteration_changes_nothing(
    s: Schedule, observations: list[Observation], data: st.DataObject
) -> None:
    p = Progress()
    for obs in observations:
        if obs.elapsed > s.max_seconds:
            break
        p, action = decide(s, p, obs)
        if action.kind == "abort":
            break
        again = Observation(obs.iteration, data.draw(remainders), obs.elapsed)
        p2, repeat = decide(s, p, again)
        assert repeat.kind == "continue" and p2 == p


@given(
    s=schedules(),
    start=st.integers(1 << 30, 1 << 40),
    factors=st.lists(st.floats(0.3, 0.999), max_size=40),
    repeats=st.lists(st.integers(1, 3), min_size=40, max_size=40),
    gaps=st.lists(st.integers(1, 3), min_size=40, max_size=40),
)
@settings(max_examples=200)
def test_shrinking_memory_needs_no_help(
    s: Schedule, start: int, factors: list[float], repeats: list[int], gaps: list[int]
) -> None:
    """(d) Remaining memory below ``shrink`` x the last value at every iteration: only ``continue``."""
    p = Progress()
    remaining = start
    iteration = 0
    elapsed = 0.0
    for factor, n, gap in zip(factors, repeats, gaps, strict=False):
        for _ in range(n):  # the same iteration, observed more than once
            elapsed = min(elapsed + 0.01, s.max_seconds)
            p, action = decide(s, p, Observation(iteration, remaining, elapsed))
            assert action.kind == "continue"
        if remaining == 0:
            break  # nothing left to shrink: the migration is about to complete
        iteration += gap
        remaining = int(remaining * s.shrink * factor)
    assert p.downtime_step == 0 and p.throttle_step == -1 and not p.postcopy


@given(s=schedules(), data=st.data())
@settings(max_examples=150)
def test_stuck_memory_climbs_the_whole_ladder(s: Schedule, data: st.DataObject) -> None:
    """(g) Memory that never shrinks: every step of the schedule, then post-copy or abort, at known times.

    The first two passes (iterations 0 and 1) are not judged. After that each step needs one iteration to
    set the reference and ``stall_iterations`` more without progress: the k-th escalation answers the
    k * (stall_iterations + 1)-th judged iteration, and the last one (post-copy or abort) the
    L * (stall_iterations + 1)-th, L = len(downtime) - 1 + len(throttle) + 1.
    """
    every = s.stall_iterations + 1
    steps = ladder(s)
    p = Progress()
    iteration = data.draw(st.integers(0, 2))
    remaining = data.draw(st.integers(0, 1 << 30))
    judged = 0
    got: list[tuple[int, tuple[str, int]]] = []
    elapsed = 0.0
    while len(got) < len(steps):
        assert judged <= len(steps) * every  # bounded: never more iterations than the ladder needs
        counted = iteration >= 2
        judged += counted
        for _ in range(data.draw(st.integers(1, 2))):
            elapsed += s.max_seconds / 1000
            p, action = decide(s, p, Observation(iteration, remaining, elapsed))
            if action.kind != "continue":
                got.append((judged, (action.kind, action.value)))
        iteration += data.draw(st.integers(1, 3))
        remaining += data.draw(st.sampled_from([0, 0, 1, 4096]))  # never less
    assert got == [(k * every, step) for k, step in enumerate(steps, start=1)]
    if s.allow_postcopy:
        for i in range(5):  # (f) nothing more to steer, even past the time limit
            _, action = decide(s, p, Observation(iteration + i, remaining, s.max_seconds * 2))
            assert action.kind == "continue"


def test_default_schedule_gives_up_at_a_known_iteration() -> None:
    s = build_schedule(300)
    p = Progress()
    kinds = []
    for iteration in range(40):
        p, action = decide(s, p, Observation(iteration, 1 << 30, iteration * 0.5))
        kinds.append((iteration, action.kind, action.value))
        if action.kind == "abort":
            break
    acted = [k for k in kinds if k[1] != "continue"]
    # 3 downtime steps and 4 throttle steps, then abort; each after 1 + 2 judged iterations from iteration 2.
    assert [i for i, _, _ in acted] == [4, 7, 10, 13, 16, 19, 22, 25]
    assert [(k, v) for _, k, v in acted] == [
        ("set-downtime", s.downtime_ms[1]),
        ("set-downtime", s.downtime_ms[2]),
        ("set-downtime", 300),
        ("throttle", 20),
        ("throttle", 40),
        ("throttle", 60),
        ("throttle", 80),
        ("abort", 0),
    ]


def test_time_limit() -> None:
    for postcopy, kind in ((True, "postcopy"), (False, "abort")):
        s = Schedule((50, 100), allow_postcopy=postcopy, max_seconds=10)
        p, action = decide(s, Progress(), Observation(0, 1 << 30, 10.7))
        assert action.kind == kind and "11 s" in action.reason
        assert p.postcopy == postcopy
        # Exactly at the limit is still in time.
        assert decide(s, Progress(), Observation(0, 1 << 30, 10.0))[1].kind == "continue"


# --- storage modes -----------------------------------------------------------------------------------------

URI = "nbd://10.0.0.1:10809/disk0"


def _ctx(tmp_path: Path, mode: StorageMode, source: dict[str, DiskServing] | None = None) -> MoveContext:
    record = MigrationRecord(
        id="m1",
        vm="vm1",
        storage=mode,
        source=Endpoint(datastore=tmp_path, home=tmp_path / "vm1"),
        destination=Endpoint(datastore=tmp_path / "b", home=tmp_path / "b" / "vm1"),
    )
    record.facts.exports = {"disk0": URI}
    record.facts.bitmap = bitmap_name("m1")

    async def route(_purpose: str, address: str) -> str:
        return address

    async def release(_holder: Holder, _migration: str) -> None:
        return None

    spec = vm(disks=[{"name": "disk0", "size": "1M"}], nics=[])
    return MoveContext(
        record=record,
        spec=spec,
        source=VmSide(VmHome(tmp_path / "vm1"), spec, "source"),
        destination=LocalDestination("vm1", tmp_path / "b"),
        source_address="10.0.0.1",
        source_host="a",
        source_agent="http://10.0.0.1:8710",
        source_disks=source or {"disk0": DiskServing()},
        disk_bandwidth="50M",
        route=route,
        save=lambda: None,
        progress=lambda _info: None,
        release_holder=release,
    )


def test_destination_serving(tmp_path: Path) -> None:
    shared = strategy(StorageMode.SHARED).destination_serving(_ctx(tmp_path, StorageMode.SHARED), "disk0")
    assert shared.kind == Serving.REMOTE and shared.upstream == URI
    assert shared.holder == Holder(host="a", agent="http://10.0.0.1:8710")
    precopy = strategy(StorageMode.PRECOPY)
    assert precopy.destination_serving(_ctx(tmp_path, StorageMode.PRECOPY), "disk0") == DiskServing()
    post = strategy(StorageMode.POSTCOPY).destination_serving(_ctx(tmp_path, StorageMode.POSTCOPY), "disk0")
    assert post == DiskServing(
        kind=Serving.RELOCATING, upstream=URI, background="paused", dirty_bitmap="migrate-m1", bandwidth="50M"
    )  # paused until the switchover; what QEMU read before it is reconciled by the bitmap
    hybrid = strategy(StorageMode.HYBRID).destination_serving(_ctx(tmp_path, StorageMode.HYBRID), "disk0")
    assert hybrid.kind == Serving.RELOCATING and hybrid.background == "run"
    assert hybrid.dirty_bitmap == "migrate-m1"


def test_shared_keeps_a_disk_at_its_holder(tmp_path: Path) -> None:
    """A disk held by a third host stays served from there when the VM moves on with shared storage."""
    held = DiskServing(
        kind=Serving.REMOTE, upstream="nbd://10.0.0.9:1/disk0", holder=Holder(host="h", agent="http://h:1")
    )
    ctx = _ctx(tmp_path, StorageMode.SHARED, {"disk0": held})
    assert strategy(StorageMode.SHARED).destination_serving(ctx, "disk0") == held


@pytest.mark.parametrize("mode", list(StorageMode))
def test_storage_mode_facts(mode: StorageMode) -> None:
    s = strategy(mode)
    assert s.moves_disks == (mode != StorageMode.SHARED)
    assert s.uses_bitmap == (mode in (StorageMode.POSTCOPY, StorageMode.HYBRID))
    back = strategy(mode, takes_back=True)
    assert not back.moves_disks and not back.uses_bitmap and not back.needs_export


@given(st.text(alphabet="abcdef0123456789", min_size=1, max_size=12))
def test_bitmap_names_are_per_migration(migration: str) -> None:
    name = bitmap_name(migration)
    assert name == f"migrate-{migration}" and name != bitmap_name(migration + "0")


# --- prechecks ---------------------------------------------------------------------------------------------

FLAGS = frozenset({"fpu", "sse2", "avx", "avx2"})


def host(
    *,
    available: int = 16 * GIB,
    bridges: tuple[str, ...] = ("br0",),
    model: str = "Intel(R) Xeon(R) Gold 6230",
    vendor: str = "GenuineIntel",
    flags: frozenset[str] = FLAGS,
) -> HostFacts:
    return HostFacts(
        hostname="h",
        memory=MemoryFacts(total=32 * GIB, available=available),
        cpu=CpuFacts(model=model, vendor=vendor, flags=flags, count=8),
        kvm_device=True,
        bridges=frozenset(bridges),
    )


def side(
    facts: HostFacts | None = None,
    *,
    accel: str = "kvm",
    qemu: tuple[int, int, int] = (8, 2, 1),
    version: str = "0.1.0",
    free: int = 100 * GIB,
) -> Side:
    return Side(facts or host(), accel, qemu, version, free)


def vm(**changes: Any) -> VmSpec:
    data: dict[str, Any] = {
        "name": "vm1",
        "memory_mib": 1024,
        "disks": [{"name": "disk0", "size": "1G"}],
        "nics": [{"network": "bridge:br0"}, {"network": "user"}],
    }
    data.update(changes)
    return parse_spec(data)


def test_a_clean_migration_has_no_problems() -> None:
    assert migration_problems(vm(), side(), side(), 10 * GIB) == []
    # A newer QEMU on the destination, more CPU flags there, and exactly enough space are fine.
    dest = side(host(flags=FLAGS | {"avx512f"}), qemu=(9, 0, 0), free=10 * GIB)
    assert migration_problems(vm(), side(), dest, 10 * GIB) == []


def test_memory_must_be_available_on_the_destination() -> None:
    spec = vm(memory_mib=4096)
    need = 4096 * MIB + QEMU_OVERHEAD
    assert migration_problems(spec, side(), side(host(available=need)), 0) == []
    (problem,) = migration_problems(spec, side(), side(host(available=need - 1)), 0)
    assert problem.startswith("memory_mib: 4096 MiB")
    # The source's memory does not matter.
    assert migration_problems(spec, side(host(available=0)), side(), 0) == []


def test_bridges_must_exist_on_the_destination() -> None:
    spec = vm(nics=[{"network": "bridge:br0"}, {"network": "bridge:lan1"}])
    (problem,) = migration_problems(spec, side(host(bridges=("br0", "lan1"))), side(host()), 0)
    assert problem.startswith("nics[1].network") and "'lan1'" in problem
    assert migration_problems(spec, side(), side(host(bridges=("br0", "lan1", "x"))), 0) == []


def test_the_accelerator_must_match() -> None:
    for src, dst in (("kvm", "tcg"), ("tcg", "kvm")):
        problems = migration_problems(vm(cpu_model="qemu64"), side(accel=src), side(accel=dst), 0)
        assert problems == [f"the VM runs with {src} here but would get {dst} on the destination"]


@pytest.mark.parametrize("cpu_model", [None, "host", "host,+avx2", "host,-avx"])
@pytest.mark.parametrize(
    "differs", [{"model": "AMD EPYC 7302"}, {"vendor": "AuthenticAMD"}, {"flags": FLAGS - {"avx2"}}]
)
def test_host_cpu_must_match_under_kvm(cpu_model: str | None, differs: dict[str, Any]) -> None:
    spec = vm(cpu_model=cpu_model)
    dest = side(host(**differs))
    (problem,) = migration_problems(spec, side(), dest, 0)
    assert "host CPU model" in problem and "named cpu_model" in problem
    # A named model travels anywhere; under TCG the host CPU is never passed through.
    assert migration_problems(vm(cpu_model="Skylake-Server,+avx2"), side(), dest, 0) == []
    if cpu_model is None:
        assert migration_problems(spec, side(accel="tcg"), side(host(**differs), accel="tcg"), 0) == []


def test_versions_must_fit() -> None:
    (problem,) = migration_problems(vm(), side(qemu=(8, 2, 1)), side(qemu=(8, 2, 0)), 0)
    assert problem == "the destination's QEMU 8.2.0 is older than the source's"
    assert migration_problems(vm(), side(qemu=(8, 2, 1)), side(qemu=(7, 9, 9)), 0) != []
    assert migration_problems(vm(), side(qemu=(8, 2, 1)), side(qemu=(8, 10, 0)), 0) == []  # not text order
    (problem,) = migration_problems(vm(), side(version="0.1.0"), side(version="0.2.0"), 0)
    assert problem == "hikkoshi 0.2.0 on the destination, 0.1.0 here"


def test_space_must_suffice() -> None:
    (problem,) = migration_problems(vm(), side(), side(free=GIB), GIB + 1)
    assert str(GIB) in problem and str(GIB + 1) in problem
    assert migration_problems(vm(), side(), side(free=GIB), GIB) == []


def test_every_problem_at_once() -> None:
    spec = vm(memory_mib=8192, nics=[{"network": "bridge:br9"}])
    src = side(host(bridges=("br9",)), accel="kvm", qemu=(9, 0, 0), version="1")
    dst = side(
        host(available=GIB, bridges=(), model="other"), accel="tcg", qemu=(8, 0, 0), version="2", free=0
    )
    problems = migration_problems(spec, src, dst, 1)
    assert len(problems) == 7, problems
    for text in ("memory_mib", "br9", "kvm here", "host CPU", "QEMU 8.0.0", "hikkoshi 2", "bytes free"):
        assert any(text in p for p in problems), (text, problems)


# --- the migration record ---------------------------------------------------------------------------------


def test_record_times_its_phases() -> None:
    r = new_record(created=100.0)
    r.enter(Phase.PREPARE, now=100.0)
    r.enter(Phase.HOME_FILES, now=101.5)
    r.enter(Phase.ROLLBACK, now=103.25)
    assert [(p.phase, p.started, p.seconds) for p in r.phases] == [
        (Phase.PREPARE, 100.0, 1.5),
        (Phase.HOME_FILES, 101.5, 1.75),
        (Phase.ROLLBACK, 103.25, None),
    ]
    assert r.finished is None
    with pytest.raises(PhaseError):
        r.enter(Phase.MEMORY, now=104.0)  # no way forward out of a rollback
    with pytest.raises(PhaseError):
        r.enter(Phase.ROLLBACK, now=104.0)
    assert r.phase == Phase.ROLLBACK and len(r.phases) == 3 and r.phases[-1].seconds is None
    r.enter(Phase.ROLLED_BACK, now=110.0)
    assert r.phases[-2].seconds == 6.75 and r.phases[-1].seconds == 0.0 and r.finished == 110.0
    assert r.phase_seconds() == {
        "prepare-destination": 1.5,
        "home-files": 1.75,
        "rollback": 6.75,
        "rolled-back": 0.0,
    }
    for target in Phase:
        with pytest.raises(PhaseError):
            r.enter(target, now=111.0)


def test_record_refuses_to_go_back() -> None:
    r = new_record()
    for p in FORWARD[1 : FORWARD.index(Phase.ANNOUNCE) + 1]:
        r.enter(p)
    for back in [*FORWARD[: FORWARD.index(Phase.ANNOUNCE) + 1], Phase.ROLLBACK, Phase.ROLLED_BACK]:
        with pytest.raises(PhaseError):
            r.enter(back)
    assert r.phase == Phase.ANNOUNCE
    assert all(p.seconds is not None for p in r.phases[:-1])
    r.enter(Phase.FAILED)
    assert r.finished is not None and recovery(r.phase) == "inspect"


def test_store_round_trip(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path / "migrations")
    assert store.all() == []  # no directory yet
    with pytest.raises(KeyError):
        store.load("nope")
    records = []
    for i, created in enumerate((300.0, 100.0, 200.0)):
        facts = {"destination_supervisor_pid": 4000 + i}
        r = new_record(created=created, settings={"max_downtime_ms": 100 + i}, facts=facts)
        r.enter(Phase.PREPARE, now=created + 1)
        r.report = {"bytes": [1, 2, 3], "nested": {"ok": True}}
        assert store.save(r) == store.path / f"{r.id}.json"
        records.append(r)
    for r in records:
        assert store.load(r.id) == r
    assert [r.created for r in store.all()] == [100.0, 200.0, 300.0]  # oldest first
    # Saving again replaces the file (no temporary files left behind).
    records[0].enter(Phase.FAILED, now=400.0)
    store.save(records[0])
    assert store.load(records[0].id).phase == Phase.FAILED
    assert sorted(p.name for p in store.path.iterdir()) == sorted(f"{r.id}.json" for r in records)
    assert len({r.id for r in records}) == 3


@pytest.mark.parametrize(
    "damage",
    [
        b"{not json",
        b"",
        b"\xff\xfe garbage",
        json.dumps({"vm": "x"}).encode(),  # missing fields
        json.dumps({"vm": "x", "storage": "teleport", "source": {}, "destination": {}}).encode(),
    ],
)
def test_damaged_records_are_refused_and_skipped(tmp_path: Path, damage: bytes) -> None:
    store = MigrationStore(tmp_path)
    good = new_record()
    store.save(good)
    (tmp_path / "bad.json").write_bytes(damage)
    with pytest.raises(ValueError, match=r"bad\.json"):
        store.load("bad")
    assert store.all() == [good]


def test_a_record_with_a_future_phase_is_refused(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    r = new_record()
    path = store.save(r)
    data = json.loads(path.read_text())
    data["phase"] = "teleported"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError):
        store.load(r.id)
    assert store.all() == []


# --- the incoming disk plan --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "relocating"},  # no upstream
        {"kind": "remote", "upstream": URI},  # no holder
        {"kind": "file", "upstream": URI},
        {"kind": "relocating", "upstream": "http://x/y"},
        {"kind": "relocating", "upstream": URI, "background": "later"},
        {"kind": "relocating", "upstream": URI, "colour": "blue"},  # unknown field
        {"kind": "elsewhere"},
    ],
)
def test_bad_disk_servings_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DiskServing(**fields)


def test_good_disk_servings() -> None:
    assert DiskServing().kind == Serving.FILE
    unix = "nbd+unix:///disk0?socket=/run/x.sock"
    assert DiskServing(kind=Serving.REMOTE, upstream=unix, holder=Holder(host="a")).upstream == unix
    relocating = DiskServing(kind=Serving.RELOCATING, upstream="nbds://[::1]:10809/d", bandwidth="50M")
    assert relocating.bandwidth == "50M"
    before = DiskServing(kind=Serving.RELOCATING, upstream=URI, background="paused", dirty_bitmap="b")
    assert before.after_switchover() == DiskServing(kind=Serving.RELOCATING, upstream=URI)


def test_plan_round_trip(tmp_path: Path) -> None:
    home = VmHome(tmp_path)
    assert home.load_disk_plan() == DiskPlan()  # no plan: every disk a file
    plan = DiskPlan(
        migration="m1",
        disks={
            "disk0": DiskServing(kind=Serving.RELOCATING, upstream=URI, dirty_bitmap="migrate-m1"),
            "disk1": DiskServing(
                kind=Serving.REMOTE, upstream="nbd+unix:///disk1?socket=/s", holder=Holder(host="a")
            ),
        },
        geometry={"disk0": (130, 16, 63)},
    )
    home.save_disk_plan(plan)
    assert (tmp_path / PLAN_FILE).is_file()
    loaded = home.load_disk_plan()
    assert loaded == plan
    assert loaded.serving("disk0").dirty_bitmap == "migrate-m1"
    assert loaded.serving("not-named") == DiskServing()  # disks not named are files
    # A plan of files without start facts is no plan at all: nothing left behind.
    home.save_disk_plan(DiskPlan(disks={"disk0": DiskServing()}))
    assert not (tmp_path / PLAN_FILE).exists()


def test_plan_errors_name_the_file(tmp_path: Path) -> None:
    home = VmHome(tmp_path)
    path = tmp_path / PLAN_FILE
    for text in ("{oops", json.dumps({"disks": {"d": {"kind": "remote"}}})):
        path.write_text(text)
        with pytest.raises(VmStartError, match=str(path)) as err:
            home.load_disk_plan()
        assert "not valid" in str(err.value)
    path.unlink()
    path.mkdir()  # not a file at all
    with pytest.raises(VmStartError, match=str(path)):
        home.load_disk_plan()


# --- the proxy's source map after an invalidation ----------------------------------------------------------


@st.composite
def source_maps(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    pos = draw(st.integers(0, 64))
    out = []
    for _ in range(draw(st.integers(0, 12))):
        pos += draw(st.sampled_from([0, 0, 0, 7, 100]))  # mostly contiguous, gaps now and then
        length = draw(st.integers(1, 200))
        out.append((pos, length, draw(st.sampled_from([0, 1, 2, 3]))))
        pos += length
    return out


@given(
    source_map=source_maps(),
    ranges=st.lists(st.tuples(st.integers(0, 2600), st.integers(0, 300)), max_size=8),
)
@settings(max_examples=400)
def test_overlay_data_matches_a_byte_model(
    source_map: list[tuple[int, int, int]], ranges: list[tuple[int, int]]
) -> None:
    out = _overlay_data(source_map, ranges)
    # Byte model: every covered byte keeps its flags unless a range covers it, then it is data (0).
    expected: dict[int, int] = {}
    for off, n, flags in source_map:
        for b in range(off, off + n):
            expected[b] = 0 if any(o <= b < o + r for o, r in ranges) else flags
    got: dict[int, int] = {}
    for off, n, flags in out:
        assert n > 0
        for b in range(off, off + n):
            assert b not in got  # no overlaps
            got[b] = flags
    assert got == expected
    # Extents are in order, and contiguous wherever the input was.
    assert [o for o, _, _ in out] == sorted(o for o, _, _ in out)
    for (o1, n1, _), (o2, _, _) in itertools.pairwise(out):
        assert o1 + n1 <= o2
        if o1 + n1 < o2:  # a gap: the input had the same one
            assert not any(o <= o1 + n1 < o + n for o, n, _ in source_map)
    if source_map:
        assert out[0][0] == source_map[0][0]
        assert out[-1][0] + out[-1][1] == source_map[-1][0] + source_map[-1][1]
    else:
        assert out == []


# --- the switchover's order, with stand-ins for both sides -------------------------------------------------


class _Source:
    """A source that records what it was asked."""

    def __init__(self, log: list[tuple[str, ...]]) -> None:
        self.log = log

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.log.append(("src", command))
        return {}

    async def wait_migration(self, states: list[str], limit: float) -> dict[str, Any]:
        self.log.append(("src", "completed"))
        return {"status": "completed"}

    async def ctl(self, command: str, **args: Any) -> Any:
        self.log.append(("src", command))
        return {}


class _Destination(LocalDestination):
    """A destination that records what it was asked."""

    def __init__(self, log: list[tuple[str, ...]], tmp: Path) -> None:
        super().__init__("vm1", tmp)
        self.log = log

    async def relocation(self, disk: str, action: str) -> dict[str, Any]:
        self.log.append(("dst", action, disk))
        return {"dirty_bytes": 0, "dropped_bytes": 0, "seconds": 0.0}

    async def wait_incoming(self, limit: float) -> qm.MigrationInfo:
        self.log.append(("dst", "completed"))
        return qm.MigrationInfo.of({"status": "completed"})


@pytest.mark.parametrize("mode", [StorageMode.HYBRID, StorageMode.POSTCOPY])
def test_switchover_leaves_the_link_to_memory_until_the_resume(tmp_path: Path, mode: StorageMode) -> None:
    """The destination's relocations stop copying before the rest of memory goes (the guest waits for it)
    and drop what the source changed while it goes; the guest resumes only after both."""
    log: list[tuple[str, ...]] = []
    request = LiveRequest(vm="vm1", source_datastore=tmp_path, storage=mode)
    c = LiveMigration(request, _Destination(log, tmp_path), MigrationStore(tmp_path / "records"))
    c.spec = vm(disks=[{"name": "d0", "size": "1M"}, {"name": "d1", "size": "1M"}], nics=[])
    c.source = _Source(log)  # type: ignore[assignment]
    asyncio.run(c._switchover())
    pauses = [log.index(("dst", "pause", d)) for d in ("d0", "d1")]
    drops = [log.index(("dst", "invalidate", d)) for d in ("d0", "d1")]
    assert max(pauses) < log.index(("src", "migrate-continue")) and max(pauses) < min(drops)
    assert set(c.report["switchover"]["storage"]) == {"d0", "d1"}


class _FlakyUndo(Job):
    """A job whose destination dies in the memory copy, and whose rollback must wait once for it."""

    def __init__(self, store: MigrationStore) -> None:
        super().__init__(store, None)
        self.record = new_record()
        self.undo_calls = 0

    async def precheck(self) -> None:
        return None

    def before_commit(self) -> list[Step]:
        async def stream() -> None:
            raise RuntimeError("the destination agent died")

        return [(Phase.MEMORY, stream)]

    async def commit(self) -> None:
        raise AssertionError("never reached")

    def after_commit(self) -> list[Step]:
        return []

    async def undo(self) -> list[str]:
        self.undo_calls += 1
        if self.undo_calls == 1:
            raise SideError("destination agent does not answer", transient=True)
        return []


def test_a_rollback_that_waited_records_why_it_rolled_back(tmp_path: Path) -> None:
    # The endurance run's interrupted migration ended rolled-back with the error "waiting (rollback):
    # ... does not answer": the last wait, not why it failed. However often it waits, the record keeps
    # the cause, and says the wait only while it waits.
    job = _FlakyUndo(MigrationStore(tmp_path))
    with pytest.raises(MigrationPending):
        asyncio.run(job.run())
    assert job.record.phase == Phase.ROLLBACK
    assert job.record.error == (
        "the destination agent died; waiting (rollback): destination agent does not answer"
    )
    with pytest.raises(MigrationPending):
        job.undo_calls = 0
        asyncio.run(job.recover())
    assert job.record.error is not None and job.record.error.count("waiting") == 1
    record = asyncio.run(job.recover())
    assert (record.phase, record.error) == (Phase.ROLLED_BACK, "the destination agent died")
