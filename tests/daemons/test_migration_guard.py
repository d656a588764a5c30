"""The source supervisor's migration guard (pure): exactly one of "fired" and "committed" per migration."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hikkoshi.daemons.migration_guard import Guard, GuardRefused, GuardState


def test_silence_fires_renewal_does_not() -> None:
    g = Guard().arm("m1", now=100.0, timeout=10.0)
    assert g.state == GuardState.ARMED and not g.due(109.0) and g.due(110.5)
    g = g.arm("m1", now=109.0, timeout=10.0)  # renewed
    assert not g.due(110.5) and g.due(119.5)


def test_commit_after_fire_is_refused_and_fire_after_commit_never_happens() -> None:
    fired = Guard().arm("m1", 0.0, 5.0).fired()
    with pytest.raises(GuardRefused, match="cancelled here"):
        fired.commit("m1")
    with pytest.raises(GuardRefused):
        fired.arm("m1", 1.0, 5.0)  # the coordinator cannot take up a migration cancelled under it
    committed = Guard().arm("m1", 0.0, 5.0).commit("m1")
    assert not committed.due(1e9) and not committed.may_resume_source
    assert committed.arm("m1", 50.0, 5.0) == committed  # late renewals change nothing
    with pytest.raises(GuardRefused, match="cannot be undone"):
        committed.disarm("m1")
    with pytest.raises(GuardRefused, match="runs elsewhere"):
        committed.arm("m2", 60.0, 5.0)


def test_disarm_only_its_own_migration() -> None:
    g = Guard().arm("m1", 0.0, 5.0)
    assert g.disarm("m2") == g
    assert g.disarm("m1") == Guard()
    # A migration the guard fired for never commits, even after another one came in between.
    g = Guard().arm("m1", 0.0, 5.0).fired().arm("m2", 10.0, 5.0)
    with pytest.raises(GuardRefused, match="m1 was cancelled"):
        g.commit("m1")
    with pytest.raises(GuardRefused):
        Guard().arm("m1", 0.0, 0.0)


class GuardMachine(RuleBasedStateMachine):
    """Arm, renew, commit, disarm and time passing, in any order, for two migrations: the supervisor fires
    when due. Model: per migration, whether it fired and whether it committed."""

    def __init__(self) -> None:
        super().__init__()
        self.guard = Guard()
        self.now = 0.0
        self.fired: set[str] = set()
        self.committed: set[str] = set()

    migrations = st.sampled_from(["m1", "m2"])

    @rule(m=migrations, timeout=st.floats(0.5, 20.0))
    def arm(self, m: str, timeout: float) -> None:
        try:
            self.guard = self.guard.arm(m, self.now, timeout)
        except GuardRefused:
            assert m in self.fired or self.committed - {m}
        else:
            assert m not in self.fired

    @rule(m=migrations)
    def commit(self, m: str) -> None:
        try:
            self.guard = self.guard.commit(m)
        except GuardRefused:
            assert m in self.fired or self.committed - {m}
        else:
            self.committed.add(m)

    @rule(m=migrations)
    def disarm(self, m: str) -> None:
        try:
            self.guard = self.guard.disarm(m)
        except GuardRefused:
            assert self.committed

    @rule(dt=st.floats(0.0, 30.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        if self.guard.due(self.now):  # the supervisor's watcher
            assert self.guard.migration is not None
            self.fired.add(self.guard.migration)
            self.guard = self.guard.fired()

    @invariant()
    def fired_xor_committed(self) -> None:
        assert not (self.fired & self.committed)
        assert len(self.committed) <= 1  # one migration takes the VM away, and nothing after it
        assert self.guard.may_resume_source == (not self.committed)


TestGuardMachine = GuardMachine.TestCase
TestGuardMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
